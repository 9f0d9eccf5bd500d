"""The Kubernetes manifests validate against the Kubernetes 1.30 schemas (strict: no unknown fields), run the
image ``./dlbook image`` builds, and agree with it: its user, its read-only needs, its shutdown grace period."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "deploy" / "kubernetes"


def _deployments() -> dict[str, dict]:
    found = {}
    for path in MANIFESTS.glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "Deployment":
                found[doc["metadata"]["name"]] = doc
    return found


def _image_build():
    spec = importlib.util.spec_from_file_location("dlbook_image_build", REPO / "deploy" / "container" / "image.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", sorted(p.name for p in MANIFESTS.glob("*.yaml")))
def test_manifests_are_valid(path: str) -> None:
    """Every file ``kubectl apply -f deploy/kubernetes/`` reads (patches live in patches/, which it does not)."""
    docs = [d for d in yaml.safe_load_all((MANIFESTS / path).read_text()) if d]
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)


def test_one_deployment_per_kind_with_probes_resources_and_the_api_key() -> None:
    deployments = _deployments()
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


def test_deployments_run_the_built_image_as_it_expects() -> None:
    """The image's name and tag, its user, a read-only root with /tmp in memory, and a grace period longer than
    preStop plus the server's own drain time (the image's default command says how long that is)."""
    build = _image_build()
    template = (REPO / "deploy" / "container" / "Dockerfile.j2").read_text()
    image_drain = int(re.search(r'CMD \["--timeout-graceful-shutdown", "(\d+)"\]', template).group(1))
    from bentoml._internal.container.generate import BENTO_UID_GID  # the uid of BentoML's `bentoml` user

    for name, doc in _deployments().items():
        pod = doc["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert container["image"] == f"{build.IMAGE_NAME}:cpu", name  # the tag ./dlbook image gives the CPU image
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == BENTO_UID_GID
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
        assert security["capabilities"]["drop"] == ["ALL"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes[mounts["/tmp"]]["emptyDir"]["medium"] == "Memory"
        args = container["args"]
        drain = int(args[args.index("--timeout-graceful-shutdown") + 1])
        assert drain == image_drain  # args replace the image's CMD: keep its drain time
        assert args[args.index("--working-dir") + 1] == "/home/bentoml/bento/src"  # the Bento's sources
        pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
        assert pod["terminationGracePeriodSeconds"] > pre_stop + drain
        assert not any(e["name"] == "DLBOOK_ORT_INTRA_THREADS" for e in container["env"])  # from the CPU limit


def test_gpu_patch_merges_into_a_valid_deployment() -> None:
    deployment = next(d for d in yaml.safe_load_all((MANIFESTS / "poem.yaml").read_text())
                      if d and d["kind"] == "Deployment")
    patch = yaml.safe_load((MANIFESTS / "patches" / "gpu-poem.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    patched = patch["spec"]["template"]["spec"]
    assert patched["containers"][0]["name"] == container["name"]  # a strategic merge matches by name
    container["resources"]["limits"].update(patched["containers"][0]["resources"]["limits"])
    container["image"] = patched["containers"][0]["image"]
    assert container["image"] == f"{_image_build().IMAGE_NAME}:cuda"  # ./dlbook image --variant cuda
    deployment["spec"]["template"]["spec"]["tolerations"] = patched["tolerations"]
    kubernetes_validate.validate(deployment, "1.30.0", strict=True)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_the_validation_catches_a_misspelled_field() -> None:
    deployment = next(d for d in yaml.safe_load_all((MANIFESTS / "poem.yaml").read_text())
                      if d and d["kind"] == "Deployment")
    deployment["spec"]["replica"] = 3  # not a Deployment field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.30.0", strict=True)
