"""Shared helpers of the deployment tests (Dockerfile, compose, monitoring, k8s)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS_YML = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "mad-serve.json"
K8S = ROOT / "deploy" / "k8s"
COMPOSE_SCHEMA = ROOT.parent / "shared" / "schemas" / "compose-spec.json"
GPU_CONSTRAINTS = "deploy/constraints-gpu.txt"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")


# --------------------------------------------------------------------------- helpers
def read_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and version, f"{path.name}: {line!r} is not an exact pin"
        pins[canonicalize_name(name)] = version.strip()
    return pins


def settings_env_names() -> set[str]:
    from service.settings import Settings

    prefix = Settings.model_config.get("env_prefix", "")
    assert prefix == "MAD_"
    return {prefix + name.upper() for name in Settings.model_fields}


def code_env_names() -> set[str]:
    """MAD_ variables the code reads outside Settings."""
    names = set()
    for package in ("mad", "model", "runtime", "export", "service"):
        for path in (ROOT / package).rglob("*.py"):
            names |= set(re.findall(r"""["'](MAD_[A-Z0-9_]+)["']""", path.read_text()))
    return names


def validate_settings_env(env: dict[str, str], monkeypatch, where: str):
    """Every MAD_ name is read by the code, Settings() accepts the values (types, enums,
    ranges), and the concurrency limit is above the queue plus a batch (else overload meets
    503 `overloaded` before the queue bound, docs/service.md)."""
    from service.settings import Settings

    fields = settings_env_names()
    unknown = set(env) - fields - code_env_names()
    assert not unknown, f"{where}: not a `mad serve` setting: {sorted(unknown)}"
    with monkeypatch.context() as patch:
        for key in fields:
            patch.delenv(key, raising=False)
        for key, value in env.items():
            if key in fields:
                patch.setenv(key, value)
        settings = Settings()
    assert settings.limit_concurrency > settings.queue_size + settings.max_batch_size, where
    return settings


def compose_default(value):
    """`${VAR:-default}` -> default (what compose substitutes when VAR is unset)."""
    if value is None:
        return None
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value))


def load_k8s() -> dict[str, dict]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and "kind" in doc and doc["kind"] != "Kustomization":
                docs[doc["kind"]] = doc
    return docs


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = []
    for panel in dash["panels"]:
        exprs += [t["expr"] for t in panel.get("targets", []) if t.get("expr")]
        for inner in panel.get("panels", []):
            exprs += [t["expr"] for t in inner.get("targets", []) if t.get("expr")]
    for var in dash["templating"]["list"]:
        query = var.get("query")
        if var["type"] == "query":
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def dashboard_metric_refs() -> set[str]:
    return {m for expr in dashboard_exprs() for m in re.findall(r"\bmad_[a-z0-9_]+\b", expr)}


def exported_series(exposition: str) -> set[str]:
    """Series names a Prometheus scrape of this text can hold, from its # TYPE lines."""
    names = set()
    for line in exposition.splitlines():
        if not line.startswith("# TYPE "):
            continue
        _, _, name, kind = line.split()
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif kind == "summary":
            names |= {name, f"{name}_sum", f"{name}_count"}
        else:
            names.add(name)
    return names


def get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def wait_for(check, timeout: float, what: str, proc: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text()[-4000:]
            pytest.fail(f"{what}: process exited with {proc.returncode}:\n{tail}")
        try:
            result = check()
            if result:
                return result
        except OSError:
            pass
        time.sleep(0.25)
    pytest.fail(f"{what}: not within {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def stop(proc: subprocess.Popen):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
