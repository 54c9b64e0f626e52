"""compose/ checked statically (Docker does not run here): the compose file parses, everything
mounted exists, every command is a real entry point, ports do not collide, and the services name
each other and share their settings correctly."""

from __future__ import annotations

import re
import tomllib
from collections import Counter
from importlib import import_module

from taskcore.core.actions import ActionRegistry
from taskerman_scheduler.schedule_file import load_schedules
from tests.compose.deployment import (
    COMPOSE,
    COMPOSE_DIR,
    KNOWN_IMAGES,
    METRICS_PORT,
    NATS_CLIENT_PORT,
    PYPROJECT,
    ROOT,
    SCRIPTS,
    SERVICES,
    SOURCES,
    ZK_CLIENT_PORT,
    bind_source,
    by_image,
    environment,
    host_ports,
    mounts,
    ours,
    taskerman_services,
)


def test_topology() -> None:
    assert len(by_image("nats")) == 3
    assert len(by_image("zookeeper")) == 3
    assert len(taskerman_services("taskerman-scheduler")) >= 2
    assert len(taskerman_services("taskerman-router")) >= 2
    assert len(taskerman_services("taskerman-runner")) >= 3
    for name in ("jaegertracing/all-in-one", "prom/prometheus", "grafana/grafana"):
        assert len(by_image(name)) == 1, name


def test_every_bind_mount_exists_and_named_volumes_are_declared() -> None:
    declared = set(COMPOSE.get("volumes") or {})
    for name, service in SERVICES.items():
        for kind, source, target in mounts(service):
            assert target.startswith("/"), (name, target)
            if kind == "bind":
                assert (COMPOSE_DIR / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"


def test_image_is_built_from_this_repository() -> None:
    dockerfile_text = ""
    for name, service in SERVICES.items():
        if not ours(service):
            continue
        build = service["build"]
        context = (COMPOSE_DIR / build["context"]).resolve()
        assert context == ROOT, name
        dockerfile = context / build["dockerfile"]
        assert dockerfile.is_file(), name
        dockerfile_text = dockerfile.read_text()
    assert "FROM python:3.11-slim" in dockerfile_text
    assert re.search(r"pip install /src\b", dockerfile_text)
    for line in dockerfile_text.splitlines():  # everything copied into the image exists
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), line


def test_image_installs_every_package() -> None:
    """The image's `pip install /src` is not editable: a subpackage missing from [tool.setuptools]
    would be left out of it (the editable install of `make test` would not notice)."""
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    for package, directory in PYPROJECT["tool"]["setuptools"]["package-dir"].items():
        base = ROOT / directory
        for init in base.rglob("__init__.py"):
            relative = init.parent.relative_to(base)
            name = ".".join((package, *relative.parts))
            assert name in listed, f"{name} is not in [tool.setuptools] packages"


def test_every_command_is_a_console_script_or_the_images_own() -> None:
    for name, service in SERVICES.items():
        if ours(service):
            command = service["command"]
            assert isinstance(command, list), name
            assert command[0] in SCRIPTS, f"{name}: {command[0]} is not in [project.scripts]"
            module = import_module(SCRIPTS[command[0]].partition(":")[0])
            parse = getattr(module, "parse_args", None)
            if parse is not None:  # and its arguments parse
                parse(command[1:])
        else:
            image, _, tag = service["image"].rpartition(":")
            assert image in KNOWN_IMAGES, f"{name}: unknown image {service['image']}"
            assert tag not in ("", "latest"), f"{name}: pin the image's tag"
            command = service.get("command", [])
            assert not command or command[0].startswith("-"), (
                f"{name}: arguments to the image's own entrypoint"
            )


def test_no_host_port_collides() -> None:
    published = [(port, proto) for s in SERVICES.values() for _, port, proto in host_ports(s)]
    assert published
    assert [p for p, n in Counter(published).items() if n > 1] == []


def test_dependencies_exist() -> None:
    for name, service in SERVICES.items():
        depends = service.get("depends_on", [])
        for dependency in depends if isinstance(depends, list) else depends.keys():
            assert dependency in SERVICES, f"{name} depends on unknown {dependency}"
            assert dependency != name
        if isinstance(depends, dict):
            for dependency, spec in depends.items():
                if spec.get("condition") == "service_healthy":
                    assert "healthcheck" in SERVICES[dependency], f"{dependency} has no healthcheck"


def test_taskerman_services_share_the_cluster_settings() -> None:
    nats_urls = ",".join(f"nats://{n}:{NATS_CLIENT_PORT}" for n in sorted(by_image("nats")))
    zk_hosts = ",".join(f"{z}:{ZK_CLIENT_PORT}" for z in sorted(by_image("zookeeper")))
    source_text = "".join(p.read_text() for d in SOURCES for p in d.rglob("*.py"))
    for name, service in SERVICES.items():
        if not ours(service):
            continue
        env = environment(service)
        assert env["TASKERMAN_NATS_URL"] == nats_urls, name
        assert env["TASKERMAN_ZK_HOSTS"] == zk_hosts, name
        assert env["TASKERMAN_STREAM_REPLICAS"] == str(len(by_image("nats"))), name
        endpoint = re.fullmatch(r"http://([\w-]+):4318", env["OTEL_EXPORTER_OTLP_ENDPOINT"])
        assert endpoint, name
        assert endpoint.group(1) in by_image("jaegertracing/all-in-one"), name
        for variable in env:  # no typo: every TASKERMAN_* variable is read somewhere
            if variable.startswith("TASKERMAN_"):
                assert f'"{variable}"' in source_text, f"{name}: nothing reads {variable}"
    for name in taskerman_services():
        assert environment(SERVICES[name])["TASKERMAN_METRICS_PORT"] == METRICS_PORT, name


def test_taskerman_config_files() -> None:
    inventory = tomllib.loads((COMPOSE_DIR / "taskerman" / "inventory.toml").read_text())
    for name, service in taskerman_services("taskerman-runner").items():
        command = service["command"]
        cluster = command[command.index("--cluster") + 1]
        node = command[command.index("--node") + 1]
        assert node in inventory["clusters"][cluster]["nodes"], name
    for name, service in taskerman_services("taskerman-scheduler").items():
        command = service["command"]
        path = bind_source(name, command[command.index("--schedules") + 1])
        assert load_schedules(path, ActionRegistry.installed()), name
        inventory_path = bind_source(name, command[command.index("--inventory") + 1])
        assert inventory_path == COMPOSE_DIR / "taskerman" / "inventory.toml", name


def test_readme_says_how_to_start_it() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "docker compose -f compose/docker-compose.yml up" in readme
