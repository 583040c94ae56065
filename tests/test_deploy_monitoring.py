"""Prometheus and Grafana: promtool on the config and the dashboard's PromQL, dashboard metrics
against what the service really exports, and a real Prometheus scraping a real `mad serve`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.deploy_helpers import (
    COMPOSE,
    DASHBOARD,
    GRAFANA,
    PROMETHEUS,
    PROMETHEUS_YML,
    PROMTOOL,
    dashboard_exprs,
    dashboard_metric_refs,
    exported_series,
    get,
    stop,
    wait_for,
)
from tests.helpers import free_port


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian: prometheus)")
def test_prometheus_config_passes_promtool():
    result = subprocess.run(
        [PROMTOOL, "check", "config", str(PROMETHEUS_YML)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "mad")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    sd = job["dns_sd_configs"][0]
    compose = yaml.safe_load(COMPOSE.read_text())
    assert sd["names"] == ["mad"] and "mad" in compose["services"]
    assert sd["port"] == 8000


def substitute_grafana_vars(expr: str) -> str:
    return expr.replace("$__rate_interval", "1m").replace("$instance", ".*").replace("$task", ".*")


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian: prometheus)")
def test_dashboard_promql_parses(tmp_path):
    exprs = [
        substitute_grafana_vars(e) for e in dashboard_exprs() if not e.startswith("label_values(")
    ]
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"dashboard:expr{i}", "expr": e} for i, e in enumerate(exprs)],
            }
        ]
    }
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run(
        [PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- Grafana
def test_dashboard_references_only_exported_metrics():
    from service.metrics import METRIC_NAMES, Metrics

    exported = exported_series(Metrics().render().decode())
    declared = {
        line.split()[2]
        for line in Metrics().render().decode().splitlines()
        if line.startswith("# TYPE ") and not line.split()[2].endswith("_created")
    }
    assert set(METRIC_NAMES) == declared, "METRIC_NAMES and the registry disagree"
    refs = dashboard_metric_refs()
    assert refs, "the dashboard queries no mad_ metric"
    assert refs <= exported, f"not exported by the service: {sorted(refs - exported)}"
    # Every exported metric is on the dashboard.
    for name in METRIC_NAMES:
        assert any(ref == name or ref.startswith(name + "_") for ref in refs), name


def test_dashboard_panels_and_provisioning():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"]
    exprs = "\n".join(dashboard_exprs())
    for needed in (
        "rate(mad_requests_total",
        "mad_request_duration_seconds_bucket",
        "sum by (le, stage) (rate(mad_stage_duration_seconds_bucket",
        "mad_queue_depth",
        "mad_batch_size_bucket",
        "mad_gpu_memory_bytes",
        'status!~"2.."',
    ):
        assert needed in exprs, needed
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    datasources = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    source = datasources["datasources"][0]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    current = next(v for v in dash["templating"]["list"] if v["type"] == "datasource")
    assert current["current"]["value"] == source["uid"]
    providers = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "mad-serve.yml").read_text()
    )
    path = providers["providers"][0]["options"]["path"]
    compose = yaml.safe_load(COMPOSE.read_text())
    mounts = [v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"]]
    assert ["./deploy/grafana/dashboards", path] in mounts
    assert ["./deploy/grafana/provisioning", "/etc/grafana/provisioning"] in mounts


# --------------------------------------------------------------------------- Kubernetes


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (Debian: prometheus)")
def test_prometheus_scrapes_a_running_mad_serve(micro_checkpoint, tmp_path):
    """`mad serve` on the micro checkpoint; a real Prometheus with the repo's config (targets
    pointed at loopback) scrapes it and `up` is 1; the dashboard's metrics are all there."""
    port, prom_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAD_")}
    env.update(
        MAD_CHECKPOINT=str(micro_checkpoint),
        MAD_HOST="127.0.0.1",
        MAD_PORT=str(port),
        MAD_DEVICE="cpu",
        MAD_BACKEND="torch",
        MAD_PRECISION="fp32",
        MAD_WORKERS="1",
        MAD_LOG_LEVEL="warning",
        MAD_CACHE_DIR=str(tmp_path / "cache"),
        MAD_DRAIN_DELAY_S="0",
    )
    serve_log, prom_log = tmp_path / "serve.log", tmp_path / "prometheus.log"
    procs = []
    try:
        with serve_log.open("wb") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "mad.cli", "serve"],  # this checkout's code
                    cwd=Path(__file__).resolve().parents[1],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        base = f"http://127.0.0.1:{port}"
        wait_for(
            lambda: get(f"{base}/readyz")[0] == 200, 120, "mad serve /readyz", procs[0], serve_log
        )
        assert get(f"{base}/healthz")[0] == 200

        # The repo's Prometheus config, with the compose DNS target swapped for loopback.
        config = yaml.safe_load(PROMETHEUS_YML.read_text())
        config["global"].update(scrape_interval="1s", scrape_timeout="1s")
        for job in config["scrape_configs"]:
            job.pop("dns_sd_configs", None)
            target = f"127.0.0.1:{port if job['job_name'] == 'mad' else prom_port}"
            job["static_configs"] = [{"targets": [target]}]
        config_path = tmp_path / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        with prom_log.open("wb") as log:
            procs.append(
                subprocess.Popen(
                    [
                        PROMETHEUS,
                        f"--config.file={config_path}",
                        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                        f"--web.listen-address=127.0.0.1:{prom_port}",
                        "--log.level=warn",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        api = f"http://127.0.0.1:{prom_port}"
        wait_for(
            lambda: get(f"{api}/-/ready")[0] == 200, 30, "prometheus ready", procs[1], prom_log
        )

        def up():
            query = urllib.parse.quote('up{job="mad"}')
            status, body = get(f"{api}/api/v1/query?query={query}")
            result = json.loads(body)["data"]["result"] if status == 200 else []
            return result and result[0]["value"][1] == "1"

        wait_for(up, 30, 'prometheus: up{job="mad"} == 1', procs[1], prom_log)

        # What the running service exports covers every metric the dashboard queries, and
        # Prometheus stored them.
        status, body = get(f"{base}/metrics")
        assert status == 200
        exported = exported_series(body.decode())
        refs = dashboard_metric_refs()
        assert refs <= exported, f"not exported by mad serve: {sorted(refs - exported)}"
        status, body = get(f"{api}/api/v1/label/__name__/values")
        stored = set(json.loads(body)["data"])
        assert {"mad_model_info", "mad_queue_depth", "mad_gpu_memory_bytes"} <= stored
    finally:
        for proc in reversed(procs):
            stop(proc)
