"""Reading compose/ for the tests: the compose file and its services, mounts and ports, the NATS
configs, the alert rules and the dashboard."""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]


COMPOSE_DIR = ROOT / "compose"


COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"


PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


SCRIPTS: dict[str, str] = PYPROJECT["project"]["scripts"]


SOURCES = [ROOT / "libs", ROOT / "services"]


METRICS_PORT = "9464"


NATS_CLIENT_PORT = 4222


ZK_CLIENT_PORT = 2181


KNOWN_IMAGES = {"nats", "zookeeper", "jaegertracing/all-in-one", "prom/prometheus", "grafana/grafana"}


METRIC = re.compile(r"\btaskerman_[a-z0-9_]*[a-z0-9]")


HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


COMPOSE: dict[str, Any] = load_yaml(COMPOSE_FILE)


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
        for group in load_yaml(COMPOSE_DIR / "prometheus" / "alerts.yml")["groups"]
        for rule in group["rules"]
    ]


def dashboard_panels() -> list[dict[str, Any]]:
    dashboard = json.loads((COMPOSE_DIR / "grafana" / "dashboards" / "taskerman.json").read_text())
    panels: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        panels += [panel, *panel.get("panels", [])]
    return [p for p in panels if p["type"] != "row"]
