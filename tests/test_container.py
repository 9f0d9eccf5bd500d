"""The serving image: ONNX Runtime threads from the container's CPU quota (always), and the image itself,
built and run with podman (only where asked: ``DLBOOK_CONTAINER_TESTS=1``, see deploy/container/check.py).

The image test builds the serving image of the session's brief models (deploy/container/image.py: BentoML's
build and containerize with podman), runs it read-only as a non-root user on 127.0.0.1 and checks every API
against the same models served outside the container, then stops it with SIGTERM during a poem stream. It
needs podman, runc and mmdebstrap (Debian packages), Debian's mirror and PyPI, and several minutes: it is not
part of ``./dlbook test``. deploy/container/check.sh runs the same check and writes the record committed
under docs/records/.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

from serving.runtime import RuntimeConfig, container_cpu_limit

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    path = REPO / "deploy" / "container" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"dlbook_container_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _cgroup(tmp_path: Path, files: dict[str, str], self_cgroup: str) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(self_cgroup)
    return root, proc


@pytest.mark.parametrize(("files", "self_cgroup", "cpus"), [
    # cgroup v2 in a container (its own cgroup at the mount's root): --cpus 1.5 → 2 threads
    ({"cpu.max": "150000 100000\n"}, "0::/\n", 2),
    ({"cpu.max": "max 100000\n"}, "0::/\n", None),  # no limit: ORT decides
    ({"cpu.max": "50000 100000\n"}, "0::/\n", 1),  # half a CPU: still one thread
    # cgroup v2 on a host: the process's own cgroup and its parents, the tightest quota wins
    ({"kubepods/cpu.max": "400000 100000\n", "kubepods/pod1/cpu.max": "200000 100000\n",
      "kubepods/pod1/ctr/cpu.max": "max 100000\n"}, "0::/kubepods/pod1/ctr\n", 2),
    # cgroup v1 (Docker/podman with runc, no cgroup namespace): /proc/self/cgroup names the host's path,
    # which is not there inside the container; the cpu controller's mount root is the container's cgroup
    ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"},
     "4:cpu:/libpod_parent/libpod-0123\n3:memory:/libpod_parent/libpod-0123\n", 1),
    ({"cpu,cpuacct/cpu.cfs_quota_us": "300000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
     "2:cpu,cpuacct:/\n", 3),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, "4:cpu:/\n", None),
    ({}, "", None),  # no cgroup file at all (not Linux, or hidden): ORT decides
    ({"cpu.max": "garbage\n"}, "0::/\n", None),
])
def test_container_cpu_limit_reads_the_cgroup_quota(tmp_path: Path, files: dict[str, str], self_cgroup: str,
                                                    cpus: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    root, proc = _cgroup(tmp_path, files, self_cgroup)
    assert container_cpu_limit(root, proc) == cpus


def test_container_cpu_limit_is_capped_by_the_cpuset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    root, proc = _cgroup(tmp_path, {"cpu.max": "800000 100000\n"}, "0::/\n")
    assert container_cpu_limit(root, proc) == 2


def test_ort_intra_threads_follow_the_cpu_limit_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    import serving.runtime as runtime

    monkeypatch.setattr(runtime, "container_cpu_limit", lambda: 3)
    monkeypatch.delenv("DLBOOK_ORT_INTRA_THREADS", raising=False)
    assert RuntimeConfig.from_env().intra_op_threads == 3
    monkeypatch.setenv("DLBOOK_ORT_INTRA_THREADS", "0")  # 0: ORT's own choice, as documented
    assert RuntimeConfig.from_env().intra_op_threads == 0
    monkeypatch.setenv("DLBOOK_ORT_INTRA_THREADS", "5")
    assert RuntimeConfig.from_env().intra_op_threads == 5
    monkeypatch.delenv("DLBOOK_ORT_INTRA_THREADS")
    monkeypatch.setattr(runtime, "container_cpu_limit", lambda: None)  # no quota: ORT's choice
    assert RuntimeConfig.from_env().intra_op_threads == 0


def test_cpu_variant_swaps_the_onnx_runtime_build_and_keeps_every_other_pin() -> None:
    image = _load("image")
    serving = [line.split("#")[0].strip() for line in (REPO / "requirements-serving.txt").read_text().splitlines()]
    serving = [line for line in serving if line]
    cpu = image.variant_requirements("cpu")
    gpu_pin = next(line for line in serving if line.startswith("onnxruntime-gpu=="))
    assert f"onnxruntime=={gpu_pin.split('==')[1]}" in cpu and not any("onnxruntime-gpu" in p for p in cpu)
    assert sorted(p for p in cpu if not p.startswith("onnxruntime")) == sorted(
        p for p in serving if not p.startswith("onnxruntime"))
    assert not any(p.startswith("torch") for p in cpu)
    assert any(p.startswith("onnxruntime-gpu[cuda,cudnn]==") for p in image.variant_requirements("cuda"))


def test_bentoml_renders_the_dockerfile_with_our_additions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """BentoML's own Dockerfile from bentofile.yaml (what `bentoml containerize` builds), with the template's
    HEALTHCHECK, drain time and build-only CA argument, the setup script, the environment, and its non-root user."""
    import yaml
    from bentoml._internal.bento.build_config import CondaOptions, DockerOptions
    from bentoml._internal.container.generate import generate_containerfile

    # BentoML (1.4.36 to 1.4.39 at least) reads the template only from under the working directory:
    # https://github.com/bentoml/BentoML/issues/5566; the chdir can go with that fix, as in deploy/container/image.py
    monkeypatch.chdir(REPO)
    docker = yaml.safe_load((REPO / "bentofile.yaml").read_text())["docker"]
    (tmp_path / "env" / "docker").mkdir(parents=True)
    text = generate_containerfile(DockerOptions(**docker).with_defaults(), build_ctx=str(REPO), conda=CondaOptions(),
                                  bento_fs=tmp_path, enable_buildkit=False, add_header=False)
    after_user = text[text.index("\nUSER bentoml\n"):]
    assert "HEALTHCHECK" in after_user and "/readyz" in after_user
    assert 'CMD ["--timeout-graceful-shutdown", "25"]' in after_user and "STOPSIGNAL SIGTERM" in after_user
    assert "ARG SSL_CERT_FILE" in text and "ENV SSL_CERT_FILE" not in text  # the CA bundle never stays in the image
    assert "env/docker/setup_script" in text
    for name in ("BENTOML_DO_NOT_TRACK", "ORT_DISABLE_TELEMETRY", "PYTHONDONTWRITEBYTECODE"):
        assert f"ENV {name}=" in text
    assert text.index("RUN /home/bentoml/bento/env/docker/setup_script") < text.index("\nUSER bentoml\n")


CONTAINER_TESTS = os.environ.get("DLBOOK_CONTAINER_TESTS") == "1"
_TOOLS = all(shutil.which(t) for t in ("podman", "runc"))


# The container tier: ./dlbook test deselects it (marker ``container``; several minutes of image build
# would push CI past its budget); DLBOOK_CONTAINER_TESTS=1 .venv/bin/python -m pytest -m container runs it.
@pytest.mark.container
@pytest.mark.skipif(not CONTAINER_TESTS or not _TOOLS,
                    reason="builds and runs the serving image: DLBOOK_CONTAINER_TESTS=1 with podman, runc and "
                           "mmdebstrap installed (several minutes; deploy/container/check.sh is the same check)")
def test_the_image_serves_every_api_like_the_models_outside_it_and_drains_on_sigterm(
        exported: dict[str, dict], tmp_path: Path) -> None:
    check = _load("check")
    models = [exported[k]["name"] for k in ("lenet", "mlp", "price_mlp", "poem_rnn")]
    record = check.run_check(models=models, work=tmp_path)
    failed = [c for c in record["checks"] if not c["ok"]]
    assert not failed, failed
