"""Kubernetes manifests: they parse; probes, ports and env match the service's Settings."""

from __future__ import annotations

import yaml

from tests.deploy_helpers import (
    K8S,
    code_env_names,
    load_k8s,
    settings_env_names,
    validate_settings_env,
)


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

    # A ready export from `mad export --format tensorrt` at its default --max-batch must
    # serve the ConfigMap's batches as it is: /models is read-only, nothing is rebuilt there.
    assert settings.max_batch_size <= Profile().max_batch, "batches must fit default engines"
    probes = {
        kind: container[kind]["httpGet"]
        for kind in ("livenessProbe", "readinessProbe", "startupProbe")
    }
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["startupProbe"]["path"] == "/readyz", "/healthz passes before the model loads"
    for probe in probes.values():
        assert probe["port"] in ("http", settings.port)
    # The server waits for the endpoint removal itself (MAD_DRAIN_DELAY_S): no preStop sleep.
    assert "preStop" not in container.get("lifecycle", {})
    assert settings.drain_delay_s >= 5, "endpoint removal takes seconds to propagate"
    from service.server import SHUTDOWN_MARGIN_S

    drain = settings.drain_delay_s + settings.request_timeout_s + 2 * SHUTDOWN_MARGIN_S
    assert spec["terminationGracePeriodSeconds"] >= drain, "grace must outlast the drain"
    assert settings.limit_concurrency > settings.queue_size + settings.max_batch_size
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
