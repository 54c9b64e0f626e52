"""compose/ checked statically (Docker does not run here): the files parse, everything mounted exists,
every command is a real entry point, ports do not collide, and the pieces name each other correctly."""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from collections import Counter
from collections.abc import Iterator
from importlib import import_module
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from taskcore.core.actions import ActionRegistry
from taskerman_dev.launchers import nats_server_binary
from taskerman_scheduler.schedule_file import load_schedules

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPTS: dict[str, str] = PYPROJECT["project"]["scripts"]
SOURCES = [ROOT / "libs", ROOT / "services"]
METRICS_PORT = "9464"
NATS_CLIENT_PORT = 4222
ZK_CLIENT_PORT = 2181
# Images other than ours, pinned, and run with their own entrypoint: a `command` may only pass flags.
KNOWN_IMAGES = {"nats", "zookeeper", "jaegertracing/all-in-one", "prom/prometheus", "grafana/grafana"}
METRIC = re.compile(r"\btaskerman_[a-z0-9_]*[a-z0-9]")
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


COMPOSE: dict[str, Any] = _load(COMPOSE_FILE)
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]


def ours(service: dict[str, Any]) -> bool:
    """Whether the service runs the Taskerman image built from compose/Dockerfile."""
    return "build" in service


def by_image(name: str) -> dict[str, dict[str, Any]]:
    """The services running `name` (any tag)."""
    return {k: s for k, s in SERVICES.items() if not ours(s) and s["image"].rpartition(":")[0] == name}


def taskerman_services(script: str | None = None) -> dict[str, dict[str, Any]]:
    """Our long-running services (the on-demand `tools` profile left out), optionally of one script."""
    return {
        k: s
        for k, s in SERVICES.items()
        if ours(s) and "tools" not in s.get("profiles", []) and script in (None, s["command"][0])
    }


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: str(v) for k, v in env.items()}


def mounts(service: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(type, source, target) of each volume entry, short or long syntax."""
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            yield volume["type"], volume["source"], volume["target"]
        else:
            source, _, rest = volume.partition(":")
            kind = "bind" if source.startswith((".", "/", "~")) else "volume"
            yield kind, source, rest.partition(":")[0]


def bind_source(service_name: str, container_path: str) -> Path:
    """The host file behind a path inside a container, through the service's bind mounts."""
    target = PurePosixPath(container_path)
    for kind, source, mount in mounts(SERVICES[service_name]):
        if kind == "bind" and (target == PurePosixPath(mount) or PurePosixPath(mount) in target.parents):
            return COMPOSE_DIR / source / target.relative_to(mount)
    raise AssertionError(f"{service_name}: nothing mounted at {container_path}")


def host_ports(service: dict[str, Any]) -> Iterator[tuple[str, int, str]]:
    """(host ip, host port, protocol) of each published port."""
    for port in service.get("ports", []):
        if isinstance(port, dict):
            if "published" in port:
                yield port.get("host_ip", ""), int(port["published"]), port.get("protocol", "tcp")
            continue
        spec, _, proto = str(port).partition("/")
        parts = spec.rsplit(":", 2)
        if len(parts) >= 2:
            ip = parts[0] if len(parts) == 3 else ""
            yield ip, int(parts[-2]), proto or "tcp"


def _field(pattern: str, text: str, flags: int = 0) -> str:
    found = re.search(pattern, text, flags)
    assert found, pattern
    return found.group(1)


def nats_conf(path: Path) -> dict[str, Any]:
    """The few fields of a nats-server config that the deployment relies on."""
    text = re.sub(r"#.*", "", path.read_text())
    jetstream = _field(r"jetstream\s*\{([^}]*)\}", text)
    cluster = _field(r"cluster\s*\{(.*?)\n\}", text, re.S)
    return {
        "server_name": _field(r"^server_name\s*:\s*(\S+)", text, re.M),
        "listen": _field(r"^listen\s*:\s*(\S+)", text, re.M),
        "sync_always": bool(re.search(r"sync_interval\s*:\s*always\b", jetstream)),
        "cluster_listen": _field(r"listen\s*:\s*(\S+)", cluster),
        "routes": re.findall(r"nats-route://([\w.-]+):(\d+)", _field(r"routes\s*:\s*\[([^\]]*)\]", cluster)),
    }


def documented_metrics() -> set[str]:
    """Metric names the README's multi-node section documents."""
    readme = (ROOT / "README.md").read_text()
    section = readme.partition("## Multi-node deployment")[2].partition("\n## ")[0]
    return set(METRIC.findall(section))


def base_metric(name: str) -> str:
    """The instrument behind a Prometheus series name (`_total` of counters, histogram series)."""
    for suffix in (*HISTOGRAM_SERIES, "_total"):
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def alert_rules() -> list[dict[str, Any]]:
    return [
        rule
        for group in _load(COMPOSE_DIR / "prometheus" / "alerts.yml")["groups"]
        for rule in group["rules"]
    ]


def dashboard_panels() -> list[dict[str, Any]]:
    dashboard = json.loads((COMPOSE_DIR / "grafana" / "dashboards" / "taskerman.json").read_text())
    panels: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        panels += [panel, *panel.get("panels", [])]
    return [p for p in panels if p["type"] != "row"]


# --- the compose file -----------------------------------------------------------------------------------


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


# --- NATS and ZooKeeper ---------------------------------------------------------------------------------


def test_nats_cluster_is_a_full_mesh_with_fsync() -> None:
    nodes = by_image("nats")
    names = set()
    for name, service in nodes.items():
        assert service["command"][-2:] == ["--config", "/etc/nats/nats.conf"] or "-c" in service["command"]
        conf = nats_conf(bind_source(name, service["command"][-1]))
        assert conf["sync_always"], name
        assert conf["listen"].endswith(f":{NATS_CLIENT_PORT}"), name
        cluster_port = conf["cluster_listen"].rpartition(":")[2]
        routes = {host for host, port in conf["routes"] if port == cluster_port}
        assert len(routes) == len(conf["routes"]), f"{name}: a route to another port than {cluster_port}"
        assert routes | {name} == set(nodes), f"{name} routes to {sorted(routes)}"
        names.add(conf["server_name"])
    assert len(names) == len(nodes)


def test_nats_configs_pass_nats_server_check() -> None:
    for name, service in by_image("nats").items():
        path = bind_source(name, service["command"][-1])
        out = subprocess.run(
            [nats_server_binary(), "-t", "-c", str(path)], capture_output=True, text=True, check=False
        )
        assert out.returncode == 0, out.stderr


def test_zookeeper_ensemble() -> None:
    nodes = by_image("zookeeper")
    ids = {}
    for name, service in nodes.items():
        env = environment(service)
        ids[name] = int(env["ZOO_MY_ID"])
        servers = dict(s.split("=", 1) for s in env["ZOO_SERVERS"].split())
        assert set(servers) == {f"server.{i}" for i in range(1, len(nodes) + 1)}, name
        for key, address in servers.items():
            host = address.partition(":")[0]
            assert host in nodes, f"{name}: {key} names unknown host {host}"
            assert int(environment(nodes[host])["ZOO_MY_ID"]) == int(key.partition(".")[2]), (name, key)
            assert address.endswith(f";{ZK_CLIENT_PORT}"), (name, key)
        assert "srvr" in env["ZOO_4LW_COMMANDS_WHITELIST"].split(","), name
        assert env["ZOO_ADMINSERVER_ENABLED"] == "false", name
    assert sorted(ids.values()) == list(range(1, len(nodes) + 1))


# --- Prometheus and Grafana -----------------------------------------------------------------------------


def test_prometheus_scrapes_every_service_and_loads_the_rules() -> None:
    [(name, prometheus)] = by_image("prom/prometheus").items()
    config_path = next(a.partition("=")[2] for a in prometheus["command"] if a.startswith("--config.file="))
    config = _load(bind_source(name, config_path))
    for rule_file in config["rule_files"]:
        assert _load(bind_source(name, rule_file))["groups"]
    scraped = set()
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            for target in static["targets"]:
                host, _, port = target.rpartition(":")
                if host == "localhost":
                    continue
                assert host in SERVICES, f"{job['job_name']}: {host} is not a service"
                assert port == environment(SERVICES[host])["TASKERMAN_METRICS_PORT"], target
                scraped.add(host)
    assert scraped == set(taskerman_services())


def test_alert_rules_cover_the_failure_modes() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(set(names)) == len(names)
    used = {base_metric(m) for r in rules for m in METRIC.findall(r["expr"])}
    for metric in (
        "taskerman_dead_letters",
        "taskerman_runner_stale",
        "taskerman_canary_age_seconds",
        "taskerman_breaker_open",
        "taskerman_stream_pending",
    ):
        assert metric in used, metric
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]


def test_grafana_provisioning() -> None:
    [(name, _)] = by_image("grafana/grafana").items()
    datasources = _load(bind_source(name, "/etc/grafana/provisioning/datasources/datasources.yml"))
    uids = {d["uid"]: d for d in datasources["datasources"]}
    host = re.fullmatch(r"http://([\w-]+):9090", uids["prometheus"]["url"])
    assert host
    assert host.group(1) in by_image("prom/prometheus")
    providers = _load(bind_source(name, "/etc/grafana/provisioning/dashboards/dashboards.yml"))
    [provider] = providers["providers"]
    assert (bind_source(name, provider["options"]["path"]) / "taskerman.json").is_file()
    for panel in dashboard_panels():
        assert panel["datasource"]["uid"] in uids, panel["title"]


def test_dashboard_queries_use_known_metrics() -> None:
    known = {base_metric(m) for r in alert_rules() for m in METRIC.findall(r["expr"])} | documented_metrics()
    seen = set()
    for panel in dashboard_panels():
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
            for metric in METRIC.findall(target["expr"]):
                assert base_metric(metric) in known, f"{panel['title']}: {metric} unknown"
                seen.add(base_metric(metric))
    for metric in (  # the panels the issue asks for
        "taskerman_items_executed",
        "taskerman_items_succeeded",
        "taskerman_items_failed",
        "taskerman_lease_wait_seconds",
        "taskerman_action_duration_seconds",
        "taskerman_dead_letters",
        "taskerman_breaker_open",
        "taskerman_runner_stale",
        "taskerman_canary_age_seconds",
        "taskerman_stream_pending",
    ):
        assert metric in seen, metric


def test_readme_says_how_to_start_it() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "docker compose -f compose/docker-compose.yml up" in readme
