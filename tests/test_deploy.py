"""Deployment files: Dockerfile, docker-compose.yml, Prometheus, Grafana and Kubernetes.

No Docker engine or cluster runs here, so these tests check what can be checked without one:
the compose file against the Compose Specification schema, the Prometheus config with
promtool, a real Prometheus scraping a real `mad serve`, the dashboard's PromQL against the
metrics the service really exports, the manifests' probes/ports/env against the service's
Settings, and the Dockerfile's pip installs against the Makefile's (same constraints, same
pinned set).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

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
                rest = words[i + 2:]
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
    """MAD_ variables the code reads outside Settings (e.g. export's MAD_CACHE_DIR)."""
    names = set()
    for package in ("mad", "model", "export", "service"):
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
                part, re.escape(part))
        parts = path.strip("/").split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
def test_dockerfile_installs_like_the_makefile():
    """Same constraints file, same pinned set: the image cannot drift from what CI tests."""
    make = [i for line in (ROOT / "Makefile").read_text().splitlines()
            for i in pip_installs(line)]
    make_project = [i for i in make if project_install(i) is not None]
    assert len(make_project) == 1, make
    make_install = make_project[0]
    assert make_install["constraints"] == ["constraints.txt"]
    make_extras = project_install(make_install)

    docker = {}
    for name in ("cpu-builder", "gpu-builder"):
        runs = [args for keyword, args in stage(name) if keyword == "RUN"]
        installs = [i for run in runs for i in pip_installs(run)]
        project = [i for i in installs if project_install(i) is not None]
        assert len(project) == 1, f"{name}: one install of the project, got {installs}"
        install = project[0]
        # Everything else a stage pip-installs is pip itself.
        for other in installs:
            if other is not install:
                assert other["targets"] == ["pip"] and not other["constraints"], other
        assert install["constraints"][:1] == make_install["constraints"]
        assert set(install["constraints"][1:]) <= {GPU_CONSTRAINTS}
        assert not install["editable"], "the image installs the project non-editable"
        assert install["targets"] == [t for t in install["targets"] if t.startswith(".")], (
            f"{name}: nothing but the project is installed: {install['targets']}")
        assert not {"-r", "--requirement", "--no-deps", "--pre", "--no-index"} & set(
            install["flags"]), install["flags"]
        docker[name] = (install, project_install(install))
        copied = " ".join(args for keyword, args in stage(name) if keyword == "COPY")
        for needed in ("pyproject.toml", "constraints.txt"):
            assert needed in copied.split(), f"{name} does not COPY {needed}"

    cpu_install, cpu_extras = docker["cpu-builder"]
    gpu_install, gpu_extras = docker["gpu-builder"]
    assert cpu_extras == make_extras - {"dev"} == {"onnx"}
    assert cpu_install["constraints"] == ["constraints.txt"]
    assert gpu_extras == {"gpu", "tensorrt"}
    assert gpu_install["constraints"] == ["constraints.txt", GPU_CONSTRAINTS]
    copied = " ".join(args for keyword, args in stage("gpu-builder") if keyword == "COPY")
    assert GPU_CONSTRAINTS in copied

    # The pinned set: every requirement of pyproject (and the extras installed anywhere) is
    # pinned exactly, satisfies pyproject's specifier, and GPU pins only add packages.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = read_pins(ROOT / "constraints.txt")
    gpu_pins = read_pins(ROOT / GPU_CONSTRAINTS)
    assert not set(pins) & set(gpu_pins), "constraints-gpu.txt must not re-pin constraints.txt"
    needed = [(r, "constraints.txt") for r in project["dependencies"]]
    for extra in make_extras | cpu_extras:
        needed += [(r, "constraints.txt") for r in project["optional-dependencies"][extra]]
    for extra in gpu_extras:
        needed += [(r, "either") for r in project["optional-dependencies"][extra]]
    for text, where in needed:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        version = pins.get(name) or (gpu_pins.get(name) if where == "either" else None)
        assert version, f"{req.name} is not pinned ({where})"
        assert req.specifier.contains(version, prereleases=True), (
            f"pin {req.name}=={version} does not satisfy pyproject's {text!r}")
    for text in project["dependencies"]:
        req = Requirement(text)
        for spec in req.specifier:
            if spec.operator == "==":
                assert pins[canonicalize_name(req.name)] == spec.version
    # export/tensorrt.py builds weakly typed FP16 engines: TensorRT 10 only.
    assert Version(gpu_pins["tensorrt"]).major == 10
    # CPU and GPU images run the same onnxruntime release line.
    cpu_ort, gpu_ort = Version(pins["onnxruntime"]), Version(gpu_pins["onnxruntime-gpu"])
    assert cpu_ort.major == gpu_ort.major and 0 <= cpu_ort.minor - gpu_ort.minor <= 1
    # Python: the images run the interpreter constraints.txt was resolved for.
    assert re.search(r"python:3\.11", DOCKERFILE.read_text())
    assert "python3.11" in " ".join(a for k, a in stage("gpu-base") if k == "RUN")
    from packaging.specifiers import SpecifierSet

    assert SpecifierSet(project["requires-python"]).contains("3.11")


def test_dockerfile_runtime_stages():
    stages = [name for name, _ in dockerfile_stages()]
    assert stages[-1] == "gpu", "the default target (last stage) is the GPU image"
    assert "cpu" in stages
    settings_port = None
    try:
        from service.settings import Settings

        settings_port = Settings.model_fields["port"].default
    except ImportError:  # pragma: no cover - the service always ships settings
        pass
    for name in ("cpu", "gpu"):
        instructions = stage(name)
        keywords = [k for k, _ in instructions]
        user = [a for k, a in instructions if k == "USER"]
        assert user and user[-1].split(":")[0] not in ("root", "0"), f"{name} runs as root"
        assert json.loads([a for k, a in instructions if k == "ENTRYPOINT"][-1]) == [
            "mad", "serve"]
        health = [a for k, a in instructions if k == "HEALTHCHECK"][-1]
        assert "/readyz" in health and "urllib.request" in health and "curl" not in health
        volumes = json.loads([a for k, a in instructions if k == "VOLUME"][-1])
        assert {"/models", "/cache"} <= set(volumes)
        env = stage_env(name)
        assert env["MAD_CACHE_DIR"] == "/cache"
        # An MAD_EXPORT_DIR must hold a ready export; unset, onnx/tensorrt export into the cache.
        assert "MAD_EXPORT_DIR" not in env
        checkpoint_copies = [a.split() for k, a in instructions
                             if k == "COPY" and "checkpoints/mad-tiny" in a]
        assert checkpoint_copies and checkpoint_copies[0][-1] == env["MAD_CHECKPOINT"]
        exposed = [a for k, a in instructions if k == "EXPOSE"][-1]
        assert exposed == env["MAD_PORT"]
        if settings_port is not None:
            assert int(exposed) == settings_port
        assert keywords.index("USER") > max(
            i for i, k in enumerate(keywords) if k == "RUN"), "USER after the last RUN"
    assert stage_env("cpu")["MAD_DEVICE"] == "cpu"
    assert stage_env("gpu")["MAD_DEVICE"] == "cuda"


def test_dockerfile_copies_exist_and_are_in_the_build_context():
    for name, instructions in dockerfile_stages():
        for keyword, args in instructions:
            if keyword != "COPY" or "--from=" in args:
                continue
            sources = [w for w in shlex.split(args) if not w.startswith("--")][:-1]
            for source in sources:
                assert (ROOT / source).exists(), f"{name}: COPY {source}: not in the repo"
                assert not dockerignored(source), f"{name}: COPY {source}: in .dockerignore"
    assert dockerignored(".venv") and dockerignored(".git") and dockerignored("runs/x")
    assert dockerignored("mad/__pycache__/cli.cpython-311.pyc")
    assert not dockerignored("checkpoints/mad-tiny/config.json")


def test_healthcheck_fails_when_nothing_listens():
    health = [a for k, a in stage("gpu") if k == "HEALTHCHECK"][-1]
    command = shlex.split(health.split(" CMD ", 1)[1])
    assert command[:2] == ["python", "-c"]
    env = {**os.environ, "MAD_PORT": str(free_port())}
    result = subprocess.run([sys.executable, "-c", command[2]], env=env, capture_output=True,
                            timeout=30)
    assert result.returncode != 0


# --------------------------------------------------------------------------- compose
def test_compose_validates_against_the_spec():
    import jsonschema

    schema = json.loads(COMPOSE_SCHEMA.read_text())
    compose = yaml.safe_load(COMPOSE.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)
    # The schema is strict: a typo would be caught.
    broken = json.loads(json.dumps(compose))
    broken["services"]["mad"]["deploy"]["resources"]["reservations"]["device"] = []
    assert not validator.is_valid(broken)

    services = compose["services"]
    assert {"mad", "prometheus", "grafana"} <= set(services)
    # `docker compose up` (no profile) starts the GPU service, Prometheus and Grafana.
    for name in ("mad", "prometheus", "grafana"):
        assert "profiles" not in services[name]
    devices = services["mad"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert services["mad"]["build"]["target"] == "gpu"
    assert services["mad-cpu"]["build"]["target"] == "cpu"
    assert services["mad-cpu"]["profiles"] == ["cpu"]
    assert "deploy" not in services["mad-cpu"]
    targets = [name for name, _ in dockerfile_stages()]
    for service in services.values():
        if "build" in service:
            assert service["build"]["target"] in targets
    # Bind mounts point at files of this repo (user checkpoints excepted).
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source, target = compose_default(volume).split(":")[:2]
            if target == "/models":
                assert volume.endswith(":ro"), "user checkpoints are mounted read-only"
            elif source.startswith("./"):
                assert (ROOT / source).exists(), f"{name}: {source} missing"
            else:
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"
    mounts = [compose_default(v).split(":") for v in services["mad"]["volumes"]]
    assert ["/models", "ro"] in [m[1:] for m in mounts]
    assert "/cache" in [m[1] for m in mounts]
    prom_mounts = [v.split(":")[:2] for v in services["prometheus"]["volumes"]]
    assert ["./deploy/prometheus/prometheus.yml", "/etc/prometheus/prometheus.yml"] in prom_mounts


def test_compose_environment_is_valid_settings(monkeypatch):
    compose = yaml.safe_load(COMPOSE.read_text())
    for name in ("mad", "mad-cpu"):
        env = {k: compose_default(v) for k, v in compose["services"][name]["environment"].items()}
        unset = {k for k, v in env.items() if v is None}
        settings = validate_settings_env(
            {k: v for k, v in env.items() if k not in unset}, monkeypatch, name)
        assert settings.port == 8000
        assert unset <= settings_env_names() | code_env_names()
    assert compose["services"]["mad"]["environment"]["MAD_DEVICE"] == "cuda"


def test_dockerfile_environment_is_valid_settings(monkeypatch):
    for name in ("cpu", "gpu"):
        env = {k: v for k, v in stage_env(name).items() if k.startswith("MAD_")}
        settings = validate_settings_env(env, monkeypatch, f"Dockerfile stage {name}")
        assert settings.host == "0.0.0.0"


# --------------------------------------------------------------------------- Prometheus
@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian: prometheus)")
def test_prometheus_config_passes_promtool():
    result = subprocess.run([PROMTOOL, "check", "config", str(PROMETHEUS_YML)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "mad")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    sd = job["dns_sd_configs"][0]
    compose = yaml.safe_load(COMPOSE.read_text())
    assert sd["names"] == ["mad"] and "mad" in compose["services"]
    assert sd["port"] == 8000


def substitute_grafana_vars(expr: str) -> str:
    return (expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
            .replace("$task", ".*"))


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian: prometheus)")
def test_dashboard_promql_parses(tmp_path):
    exprs = [substitute_grafana_vars(e) for e in dashboard_exprs()
             if not e.startswith("label_values(")]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- Grafana
def test_dashboard_references_only_exported_metrics():
    from service.metrics import METRIC_NAMES, Metrics

    exported = exported_series(Metrics().render().decode())
    declared = {line.split()[2] for line in Metrics().render().decode().splitlines()
                if line.startswith("# TYPE ") and not line.split()[2].endswith("_created")}
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
    for needed in ("rate(mad_requests_total", "mad_request_duration_seconds_bucket",
                   "sum by (le, stage) (rate(mad_stage_duration_seconds_bucket",
                   "mad_queue_depth", "mad_batch_size_bucket", "mad_gpu_memory_bytes",
                   'status!~"2.."'):
        assert needed in exprs, needed
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    datasources = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    source = datasources["datasources"][0]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    current = next(v for v in dash["templating"]["list"] if v["type"] == "datasource")
    assert current["current"]["value"] == source["uid"]
    providers = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "mad-serve.yml").read_text())
    path = providers["providers"][0]["options"]["path"]
    compose = yaml.safe_load(COMPOSE.read_text())
    mounts = [v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"]]
    assert ["./deploy/grafana/dashboards", path] in mounts
    assert ["./deploy/grafana/provisioning", "/etc/grafana/provisioning"] in mounts


# --------------------------------------------------------------------------- Kubernetes
def test_k8s_manifests(monkeypatch):
    docs = load_k8s()
    assert {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler"} <= set(docs)
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource
    for path in (K8S / "extras").glob("*.yaml"):
        assert list(yaml.safe_load_all(path.read_text()))

    config = docs["ConfigMap"]
    settings = validate_settings_env(config["data"], monkeypatch, "k8s ConfigMap")
    assert "MAD_API_KEY" not in config["data"], "the API key belongs in a Secret"

    deployment = docs["Deployment"]
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    (container,) = spec["containers"]
    assert container["envFrom"][0]["configMapRef"]["name"] == config["metadata"]["name"]
    env_names = {e["name"] for e in container.get("env", [])}
    assert env_names <= settings_env_names() | code_env_names()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == settings.port
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert settings.workers == 1, "one model per GPU: one server process per pod"
    from export.tensorrt import Profile

    assert settings.max_batch_size <= Profile().max_batch, "batches must fit TensorRT engines"
    probes = {kind: container[kind]["httpGet"] for kind in
              ("livenessProbe", "readinessProbe", "startupProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    for probe in probes.values():
        assert probe["port"] in ("http", settings.port)
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    sleep_s = int(pre_stop[1])
    grace = spec["terminationGracePeriodSeconds"]
    assert grace > sleep_s + settings.request_timeout_s, "grace must outlast the drain"
    assert spec["securityContext"]["runAsNonRoot"] is True
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == settings.port
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/models", "/cache"} <= mounts
    assert settings.export_dir is None, "unset: onnx/tensorrt export into MAD_CACHE_DIR"
    assert config["data"]["MAD_CACHE_DIR"] == "/cache"

    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = docs["Service"]
    assert service["spec"]["selector"].items() <= labels.items()
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in ("http", settings.port)

    hpa = docs["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    from service.metrics import METRIC_NAMES

    for metric in hpa["spec"]["metrics"]:
        if metric["type"] == "Pods":
            assert metric["pods"]["metric"]["name"] in METRIC_NAMES


# --------------------------------------------------------------------------- live
@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (Debian: prometheus)")
def test_prometheus_scrapes_a_running_mad_serve(micro_checkpoint, tmp_path):
    """`mad serve` on the micro checkpoint; a real Prometheus with the repo's config (targets
    pointed at loopback) scrapes it and `up` is 1; the dashboard's metrics are all there."""
    mad = Path(sys.executable).parent / "mad"
    port, prom_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAD_")}
    env.update(MAD_CHECKPOINT=str(micro_checkpoint), MAD_HOST="127.0.0.1", MAD_PORT=str(port),
               MAD_DEVICE="cpu", MAD_BACKEND="torch", MAD_PRECISION="fp32", MAD_WORKERS="1",
               MAD_LOG_LEVEL="warning", MAD_CACHE_DIR=str(tmp_path / "cache"))
    serve_log, prom_log = tmp_path / "serve.log", tmp_path / "prometheus.log"
    procs = []
    try:
        with serve_log.open("wb") as log:
            procs.append(subprocess.Popen([str(mad), "serve"], env=env, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: get(f"{base}/readyz")[0] == 200, 120, "mad serve /readyz", procs[0],
                 serve_log)
        assert get(f"{base}/healthz")[0] == 200

        # The image's HEALTHCHECK command passes against a ready service.
        health = [a for k, a in stage("gpu") if k == "HEALTHCHECK"][-1]
        check = shlex.split(health.split(" CMD ", 1)[1])[2]
        result = subprocess.run([sys.executable, "-c", check], env=env, timeout=30)
        assert result.returncode == 0

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
            procs.append(subprocess.Popen(
                [PROMETHEUS, f"--config.file={config_path}",
                 f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        api = f"http://127.0.0.1:{prom_port}"
        wait_for(lambda: get(f"{api}/-/ready")[0] == 200, 30, "prometheus ready", procs[1],
                 prom_log)

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
