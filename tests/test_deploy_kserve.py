"""The KServe manifests (deploy/kserve/): they parse; the runtime speaks the v2 protocol on
the ports its settings give; probes, env and the drain match the service."""

from __future__ import annotations

from typing import Any

import yaml

from service.app import create_app
from tests.deploy_helpers import DOCKERFILE, ROOT, settings_env_names, validate_settings_env

KSERVE = ROOT / "deploy" / "kserve"


def manifests() -> dict[str, dict[str, Any]]:
    docs = {}
    for path in sorted(KSERVE.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc["kind"]] = doc
    return docs


def test_kserve_manifests(monkeypatch):
    docs = manifests()
    assert set(docs) == {"ServingRuntime", "InferenceService"}
    runtime, service = docs["ServingRuntime"], docs["InferenceService"]
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"

    spec = runtime["spec"]
    assert {"v2", "grpc-v2"} <= set(spec["protocolVersions"])
    (container,) = spec["containers"]
    assert container["name"] == "kserve-container"
    assert container["image"].split(":")[0] == "mad-serve"
    # The container's args go to `mad serve` (make docker-test checks the built images' too).
    assert 'ENTRYPOINT ["mad", "serve"]' in DOCKERFILE.read_text()
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert set(env) <= settings_env_names()
    settings = validate_settings_env(
        {k: v for k, v in env.items() if v is not None}, monkeypatch, "ServingRuntime"
    )
    assert settings.workers == 1, "one model per GPU: one server process per pod"
    assert settings.grpc_port is not None and settings.grpc_port != settings.port
    secret = next(e for e in container["env"] if e["name"] == "MAD_API_KEY")
    assert secret["valueFrom"]["secretKeyRef"]["optional"] is True
    (port,) = container["ports"]
    assert port["containerPort"] == settings.port

    routes = set(create_app(settings).openapi()["paths"])
    for kind in ("livenessProbe", "readinessProbe"):
        probe = container[kind]["httpGet"]
        assert probe["path"] in routes and probe["path"].startswith("/v2/health/"), kind
        assert probe["port"] == settings.port
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert spec["annotations"]["prometheus.kserve.io/port"] == str(settings.port)
    assert spec["annotations"]["prometheus.kserve.io/path"] == "/metrics" in routes

    predictor = service["spec"]["predictor"]
    model = predictor["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["protocolVersion"] == "v2"
    formats = {f["name"] for f in spec["supportedModelFormats"]}
    assert model["modelFormat"]["name"] in formats
    assert model["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert predictor["terminationGracePeriodSeconds"] > settings.request_timeout_s
    assert predictor["minReplicas"] <= predictor["maxReplicas"]
