"""Dockerfile and docker-compose.yml: installs match the Makefile's pinned set, runtime stages,
the compose file against the Compose Specification schema (no Docker engine runs here)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.deploy_helpers import (
    COMPOSE,
    COMPOSE_SCHEMA,
    DOCKERFILE,
    GPU_CONSTRAINTS,
    ROOT,
    code_env_names,
    compose_default,
    dockerfile_stages,
    dockerignored,
    pip_installs,
    project_install,
    read_pins,
    settings_env_names,
    stage,
    stage_env,
    validate_settings_env,
)
from tests.helpers import free_port


def test_dockerfile_installs_like_the_makefile():
    """Same constraints file, same pinned set: the image cannot drift from what CI tests."""
    make = [i for line in (ROOT / "Makefile").read_text().splitlines() for i in pip_installs(line)]
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
            f"{name}: nothing but the project is installed: {install['targets']}"
        )
        assert not {"-r", "--requirement", "--no-deps", "--pre", "--no-index"} & set(
            install["flags"]
        ), install["flags"]
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
            f"pin {req.name}=={version} does not satisfy pyproject's {text!r}"
        )
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
        assert json.loads([a for k, a in instructions if k == "ENTRYPOINT"][-1]) == ["mad", "serve"]
        health = [a for k, a in instructions if k == "HEALTHCHECK"][-1]
        assert "/readyz" in health and "urllib.request" in health and "curl" not in health
        volumes = json.loads([a for k, a in instructions if k == "VOLUME"][-1])
        assert {"/models", "/cache"} <= set(volumes)
        env = stage_env(name)
        assert env["MAD_CACHE_DIR"] == "/cache"
        # An MAD_EXPORT_DIR must hold a ready export; unset, onnx/tensorrt export into the cache.
        assert "MAD_EXPORT_DIR" not in env
        checkpoint_copies = [
            a.split() for k, a in instructions if k == "COPY" and "checkpoints/mad-tiny" in a
        ]
        assert checkpoint_copies and checkpoint_copies[0][-1] == env["MAD_CHECKPOINT"]
        exposed = [a for k, a in instructions if k == "EXPOSE"][-1]
        assert exposed == env["MAD_PORT"]
        if settings_port is not None:
            assert int(exposed) == settings_port
        assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN"), (
            "USER after the last RUN"
        )
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
    result = subprocess.run(
        [sys.executable, "-c", command[2]], env=env, capture_output=True, timeout=30
    )
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
            {k: v for k, v in env.items() if k not in unset}, monkeypatch, name
        )
        assert settings.port == 8000
        assert unset <= settings_env_names() | code_env_names()
    assert compose["services"]["mad"]["environment"]["MAD_DEVICE"] == "cuda"


def test_dockerfile_environment_is_valid_settings(monkeypatch):
    for name in ("cpu", "gpu"):
        env = {k: v for k, v in stage_env(name).items() if k.startswith("MAD_")}
        settings = validate_settings_env(env, monkeypatch, f"Dockerfile stage {name}")
        assert settings.host == "0.0.0.0"


# --------------------------------------------------------------------------- Prometheus
