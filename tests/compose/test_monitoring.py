"""compose/ checked statically: Prometheus scrapes every service and alerts on the failure modes;
Grafana is provisioned and its dashboard queries only known metrics."""

from __future__ import annotations

import re

from tests.compose.deployment import (
    METRIC,
    SERVICES,
    alert_rules,
    base_metric,
    bind_source,
    by_image,
    dashboard_panels,
    documented_metrics,
    environment,
    load_yaml,
    taskerman_services,
)


def test_prometheus_scrapes_every_service_and_loads_the_rules() -> None:
    [(name, prometheus)] = by_image("prom/prometheus").items()
    config_path = next(a.partition("=")[2] for a in prometheus["command"] if a.startswith("--config.file="))
    config = load_yaml(bind_source(name, config_path))
    for rule_file in config["rule_files"]:
        assert load_yaml(bind_source(name, rule_file))["groups"]
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
    datasources = load_yaml(bind_source(name, "/etc/grafana/provisioning/datasources/datasources.yml"))
    uids = {d["uid"]: d for d in datasources["datasources"]}
    host = re.fullmatch(r"http://([\w-]+):9090", uids["prometheus"]["url"])
    assert host
    assert host.group(1) in by_image("prom/prometheus")
    providers = load_yaml(bind_source(name, "/etc/grafana/provisioning/dashboards/dashboards.yml"))
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
