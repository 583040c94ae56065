"""What the built Docker images hold: their config, the installed packages at the pins
`make install` uses, the GPU image's CUDA stack, the build context's size. Run by
`make docker-test` (scripts/docker-test) after building the images."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy_helpers import ROOT, read_pins, validate_settings_env
from tests.docker_helpers import (
    BUNDLED,
    CPU_IMAGE,
    GPU_EXTRAS,
    GPU_IMAGE,
    built_images,
    in_image,
    inspect,
)

pytestmark = built_images


def test_build_context_is_small():
    """.dockerignore keeps the venv, git history, runs and data out of what the build sends."""
    log = Path(os.environ.get("MAD_DOCKER_BUILD_LOG", "/nonexistent"))
    if not log.exists():
        pytest.skip("no build log (MAD_DOCKER_BUILD_LOG)")
    match = re.search(
        r"Sending build context to Docker daemon\s+([0-9.]+)([kMG]?B)", log.read_text()
    )
    assert match, "the legacy builder reports the build context size"
    size = float(match.group(1)) * {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[match.group(2)]
    assert size < 64e6, match.group(0)


@pytest.mark.parametrize("image", ["cpu", "gpu"])
def test_image_config(image, monkeypatch):
    name = CPU_IMAGE if image == "cpu" else GPU_IMAGE
    config = inspect("image", name)["Config"]
    assert config["User"] == "mad:mad"
    assert config["Entrypoint"] == ["mad", "serve"]
    assert set(config["Volumes"]) == {"/models", "/cache"}
    env = dict(item.split("=", 1) for item in config["Env"])
    assert config["ExposedPorts"] == {f"{env['MAD_PORT']}/tcp": {}}
    assert env["MAD_CHECKPOINT"] == BUNDLED and env["MAD_CACHE_DIR"] == "/cache"
    # An MAD_EXPORT_DIR must hold a ready export; unset, onnx/tensorrt export into the cache.
    assert "MAD_EXPORT_DIR" not in env
    settings = validate_settings_env(
        {k: v for k, v in env.items() if k.startswith("MAD_")}, monkeypatch, f"image {image}"
    )
    assert settings.host == "0.0.0.0" and settings.port == 8000
    assert settings.device == ("cpu" if image == "cpu" else "cuda")
    # The interpreter constraints.txt is resolved for.
    version = in_image(name, "python", "-c", "import sys; print(*sys.version_info[:2])")
    assert version.stdout.split() == ["3", "11"], version


def installed(image: str) -> dict[str, str]:
    result = in_image(image, "pip", "list", "--format", "json")
    assert result.returncode == 0, result.stderr
    return {canonicalize_name(p["name"]): p["version"] for p in json.loads(result.stdout)}


def needed(extras: set[str]) -> set[str]:
    """The distributions the project and its `extras` need, as installed by `make` (.venv)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo = [(Requirement(r), "") for r in project["dependencies"]]
    for extra in extras:
        todo += [(Requirement(r), extra) for r in project["optional-dependencies"][extra]]
    seen: set[str] = set()
    while todo:
        req, extra = todo.pop()
        if req.marker and not req.marker.evaluate({**default_environment(), "extra": extra}):
            continue
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        for text in importlib.metadata.requires(req.name) or []:
            todo += [(Requirement(text), e) for e in ("", *req.extras)]
    return seen


def test_cpu_image_installs_what_make_installs():
    """The project, its runtime dependencies and the onnx and openvino extras (not dev), at
    the pins of constraints.txt, which `make install` and CI use."""
    packages = installed(CPU_IMAGE)
    pins = read_pins(ROOT / "constraints.txt")
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert packages.pop("mad-serve") == version
    packages.pop("pip")
    assert set(packages) == needed({"onnx", "openvino"})
    assert {name: pins.get(name) for name in packages} == packages


def test_gpu_image_installs_the_pinned_gpu_set():
    cpu, gpu = installed(CPU_IMAGE), installed(GPU_IMAGE)
    pins = read_pins(ROOT / "constraints.txt")
    gpu_pins = read_pins(ROOT / "deploy" / "constraints-gpu.txt")
    assert not set(pins) & set(gpu_pins), "constraints-gpu.txt must not re-pin constraints.txt"
    gpu.pop("mad-serve"), gpu.pop("pip")
    assert {name: pins.get(name) or gpu_pins.get(name) for name in gpu} == gpu
    # The CPU image's set, with ONNX Runtime's GPU build and TensorRT, without OpenVINO.
    # OpenVINO is a CPU backend: the GPU image goes without it.
    expected = set(cpu) - {"mad-serve", "pip", "onnxruntime", "openvino", "openvino-telemetry"}
    expected |= {"onnxruntime-gpu"}
    if "tensorrt" in GPU_EXTRAS:
        expected |= {n for n in gpu_pins if n.startswith("tensorrt")}
    assert set(gpu) == expected


LDD_CUDA_PROVIDER = """
import glob, os, site, subprocess, onnxruntime
libs = glob.glob(site.getsitepackages()[0] + "/nvidia/**/lib", recursive=True)
capi = os.path.join(os.path.dirname(onnxruntime.__file__), "capi")
env = dict(os.environ, LD_LIBRARY_PATH=":".join(libs))
ldd = ["ldd", os.path.join(capi, "libonnxruntime_providers_cuda.so")]
print(subprocess.run(ldd, env=env, capture_output=True, text=True, check=True).stdout)
"""


def test_gpu_image_imports_its_cuda_stack():
    modules = ["torch", "onnxruntime"] + (["tensorrt"] if "tensorrt" in GPU_EXTRAS else [])
    script = (
        f"import json, {', '.join(modules)}; "
        "print(json.dumps({'cuda': torch.version.cuda, "
        "'providers': onnxruntime.get_available_providers()}))"
    )
    result = in_image(GPU_IMAGE, "python", "-c", script)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.splitlines()[-1])
    assert found["cuda"].startswith("13.")
    assert {"CUDAExecutionProvider", "CPUExecutionProvider"} <= set(found["providers"])
    if "tensorrt" in GPU_EXTRAS:
        assert "TensorrtExecutionProvider" in found["providers"]
    # Every library ONNX Runtime's CUDA provider links is in the image (torch's nvidia-*
    # wheels), but the driver's libcuda.so.1, which the NVIDIA Container Toolkit brings.
    ldd = in_image(GPU_IMAGE, "python", "-c", LDD_CUDA_PROVIDER)
    missing = [line.split()[0] for line in ldd.stdout.splitlines() if "not found" in line]
    assert ldd.returncode == 0 and missing == ["libcuda.so.1"], ldd.stdout + ldd.stderr
    assert "libcublas.so.13" in ldd.stdout and "libcudart.so.13" in ldd.stdout
    help_text = in_image(GPU_IMAGE, "mad", "--help")
    assert help_text.returncode == 0 and "serve" in help_text.stdout
