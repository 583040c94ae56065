"""The pins the images install from, and docker-compose.yml against the Compose Specification
schema. `make docker-test` (tests/docker_checks.py, tests/docker_image_checks.py) builds and
runs the images and the compose service for real."""

from __future__ import annotations

import json
import re
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
    read_pins,
    settings_env_names,
    validate_settings_env,
)


# --------------------------------------------------------------------------- pins
def test_pins_cover_every_requirement_and_gpu_pins_only_add():
    """constraints.txt (what `make` and both images install from) pins every requirement of
    pyproject.toml exactly, within pyproject's bounds; deploy/constraints-gpu.txt only adds
    the GPU image's packages."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = read_pins(ROOT / "constraints.txt")
    gpu_pins = read_pins(ROOT / GPU_CONSTRAINTS)
    assert not set(pins) & set(gpu_pins), "constraints-gpu.txt must not re-pin constraints.txt"
    needed = [(r, pins) for r in project["dependencies"]]
    for extra in ("onnx", "dev"):
        needed += [(r, pins) for r in project["optional-dependencies"][extra]]
    for extra in ("gpu", "tensorrt"):
        needed += [(r, {**pins, **gpu_pins}) for r in project["optional-dependencies"][extra]]
    for text, where in needed:
        req = Requirement(text)
        version = where.get(canonicalize_name(req.name))
        assert version, f"{req.name} is not pinned"
        assert req.specifier.contains(version, prereleases=True), (
            f"pin {req.name}=={version} does not satisfy pyproject's {text!r}"
        )
    # export/tensorrt.py builds weakly typed FP16 engines: TensorRT 10 only.
    assert Version(gpu_pins["tensorrt"]).major == 10
    assert {gpu_pins[n] for n in gpu_pins if n.startswith("tensorrt")} == {gpu_pins["tensorrt"]}
    # CPU and GPU images run the same onnxruntime release line.
    cpu_ort, gpu_ort = Version(pins["onnxruntime"]), Version(gpu_pins["onnxruntime-gpu"])
    assert cpu_ort.major == gpu_ort.major and 0 <= cpu_ort.minor - gpu_ort.minor <= 1


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
    targets = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", DOCKERFILE.read_text(), re.M | re.I)
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
