"""The Kubernetes manifests validate against the Kubernetes 1.30 schemas (strict: no unknown fields)."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

MANIFESTS = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"


@pytest.mark.parametrize("path", sorted(p.name for p in MANIFESTS.glob("*.yaml")))
def test_manifests_are_valid(path: str) -> None:
    """Every file ``kubectl apply -f deploy/kubernetes/`` reads (patches live in patches/, which it does not)."""
    docs = [d for d in yaml.safe_load_all((MANIFESTS / path).read_text()) if d]
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)


def test_one_deployment_per_kind_with_probes_resources_and_the_api_key() -> None:
    deployments = {}
    for path in MANIFESTS.glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "Deployment":
                deployments[doc["metadata"]["name"]] = doc
    assert set(deployments) == {"dlbook-image", "dlbook-price", "dlbook-poem"}
    for name, doc in deployments.items():
        container = doc["spec"]["template"]["spec"]["containers"][0]
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
        assert container["resources"]["requests"] and container["resources"]["limits"]
        keys = [e for e in container["env"] if e["name"] == "DLBOOK_API_KEY"]
        assert keys and keys[0]["valueFrom"]["secretKeyRef"]["name"] == "dlbook-api-key"
        service = name.removeprefix("dlbook-").capitalize() + "Service"
        assert f"serving.service:{service}" in container["args"]


def test_gpu_patch_merges_into_a_valid_deployment() -> None:
    deployment = next(d for d in yaml.safe_load_all((MANIFESTS / "poem.yaml").read_text())
                      if d and d["kind"] == "Deployment")
    patch = yaml.safe_load((MANIFESTS / "patches" / "gpu-poem.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    patched = patch["spec"]["template"]["spec"]
    assert patched["containers"][0]["name"] == container["name"]  # a strategic merge matches by name
    container["resources"]["limits"].update(patched["containers"][0]["resources"]["limits"])
    deployment["spec"]["template"]["spec"]["tolerations"] = patched["tolerations"]
    kubernetes_validate.validate(deployment, "1.30.0", strict=True)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_the_validation_catches_a_misspelled_field() -> None:
    deployment = next(d for d in yaml.safe_load_all((MANIFESTS / "poem.yaml").read_text())
                      if d and d["kind"] == "Deployment")
    deployment["spec"]["replica"] = 3  # not a Deployment field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.30.0", strict=True)
