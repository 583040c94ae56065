"""Shared helpers of the deployment tests (Dockerfile, compose, monitoring, k8s)."""

from __future__ import annotations

import json
import os
import re
import shlex
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
def dockerfile_stages() -> list[tuple[str, list[tuple[str, str]]]]:
    """[(stage name, [(INSTRUCTION, arguments), ...]), ...], continuation lines joined."""
    instructions, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, args = current.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        current = ""
    stages: list[tuple[str, list[tuple[str, str]]]] = [("<global>", [])]
    for keyword, args in instructions:
        if keyword == "FROM":
            match = re.search(r"\s+AS\s+(\S+)\s*$", args, re.IGNORECASE)
            stages.append((match.group(1) if match else f"<stage {len(stages)}>", []))
        stages[-1][1].append((keyword, args))
    return stages


def stage(name: str) -> list[tuple[str, str]]:
    for stage_name, instructions in dockerfile_stages():
        if stage_name == name:
            return instructions
    raise AssertionError(f"Dockerfile has no stage {name!r}")


def stage_env(name: str) -> dict[str, str]:
    env = {}
    for keyword, args in stage(name):
        if keyword == "ENV":
            for token in shlex.split(args):
                key, _, value = token.partition("=")
                env[key] = value
    return env


def pip_installs(shell: str) -> list[dict]:
    """Every `pip install` in a shell command line: its constraints, flags and targets."""
    # `${VAR:+--extra-index-url "$VAR"}`: an optional index for torch wheels, nothing else.
    for optional in re.findall(r"\$\{\w+:\+([^}]*)\}", shell):
        assert shlex.split(optional)[0] == "--extra-index-url", optional
    shell = re.sub(r"\$\{\w+:\+[^}]*\}", "", shell)
    out = []
    for command in re.split(r"&&|;|\|\|", shell):
        words = shlex.split(command)
        for i, word in enumerate(words[:-1]):
            if word.endswith("pip") and words[i + 1] == "install":
                rest = words[i + 2 :]
                break
        else:
            continue
        install = {"constraints": [], "targets": [], "flags": [], "editable": False}
        j = 0
        while j < len(rest):
            word = rest[j]
            if word in ("-c", "--constraint"):
                install["constraints"].append(rest[j + 1])
                j += 2
                continue
            if word in ("-e", "--editable"):
                install["editable"] = True
            elif word.startswith("-"):
                install["flags"].append(word)
            else:
                install["targets"].append(word)
            j += 1
        out.append(install)
    return out


def project_install(install: dict) -> set[str] | None:
    """The extras of a `.[a,b]` target, or None when the install is not of the project."""
    for target in install["targets"]:
        match = re.fullmatch(r"\.(?:\[([\w,\-]*)\])?", target)
        if match:
            return {e for e in (match.group(1) or "").split(",") if e}
    return None


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
    """Every MAD_ name is read by the code, and Settings() accepts the values (types, enums,
    ranges)."""
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
        return Settings()


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


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` out of the build context (last match wins)."""
    excluded = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = ""
        for part in re.split(r"(\*\*/?|\*|\?)", pattern):
            regex += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(
                part, re.escape(part)
            )
        parts = path.strip("/").split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


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


# --------------------------------------------------------------------------- Dockerfile
