"""One small ONNX Runtime wrapper: CUDA when a GPU is really there, else CPU, and say which.

``onnxruntime-gpu`` on a machine without a GPU accepts ``CUDAExecutionProvider``, logs an error per
session and silently falls back to CPU, while ``get_available_providers()`` still lists CUDA
(https://github.com/microsoft/onnxruntime/issues/23372, https://github.com/microsoft/onnxruntime/issues/17801).
So we ask NVML whether a GPU exists before requesting CUDA, keep ORT's logger quiet while the session
is created, and report the provider the session actually got. The NVML check can go when
``get_available_providers()`` lists only providers that can start on this machine.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import onnxruntime as ort

from serving.settings import Settings

_OPTIMISATION = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def gpu_present(settings: Settings | None = None) -> bool:
    """True when a GPU may be used: ``DLBOOK_DEVICE`` is not ``cpu`` and NVML finds one."""
    return (settings or Settings.from_env()).prefer_cuda and nvml_gpu_count() > 0


@cache
def nvml_gpu_count() -> int:
    """NVIDIA GPUs NVML finds; 0 on any failure (no driver, no library)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - any NVML failure means "no usable GPU"
        return 0


def _cgroup_quota(folder: Path, version: int) -> float | None:
    """CPUs allowed by the quota file(s) in one cgroup folder, or None (no quota, no file, unreadable)."""
    try:
        if version == 2:
            quota, _, period = (folder / "cpu.max").read_text().strip().partition(" ")
            return None if quota == "max" else int(quota) / int(period or "100000")
        quota_us = int((folder / "cpu.cfs_quota_us").read_text())
        return None if quota_us <= 0 else quota_us / int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError, ZeroDivisionError):
        return None


def container_cpu_limit(root: Path = Path("/sys/fs/cgroup"),
                        proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """The CPUs this process's cgroup allows (its CPU quota, rounded up, at least 1), or None when unlimited.

    A container's ``--cpus`` / a pod's ``resources.limits.cpu`` is a CFS quota, not fewer visible cores:
    ``os.cpu_count()`` (and ONNX Runtime's default thread pool) still see every core of the host, and
    more busy threads than the quota only get throttled. cgroup v2: ``cpu.max`` (``max 100000`` or
    ``150000 100000``); v1: ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (-1: none). The process's own
    cgroup (``/proc/self/cgroup``) and its ancestors are read, the tightest quota wins; a container sees
    its own cgroup at the mount's root, which is read as well. The affinity mask (cpusets) caps it too.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    folders: list[tuple[Path, int]] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # cgroup v2: "0::/path"
            base, version = root, 2
        elif "cpu" in controllers.split(","):  # cgroup v1: "4:cpu,cpuacct:/path"
            base, version = root / controllers, 1
            if not base.is_dir():  # mounted as cpu,cpuacct or cpu: the names vary
                base = root / "cpu"
        else:
            continue
        here = base / path.strip("/")
        while True:
            folders.append((here, version))
            if here == base:
                break
            here = here.parent
    folders += [(root, 2), (root / "cpu", 1)]  # a container's own cgroup at the mount's root
    quotas = [q for folder, version in folders if (q := _cgroup_quota(folder, version)) is not None]
    if not quotas:
        return None
    cpus = max(1, math.ceil(min(quotas) - 1e-9))
    with contextlib.suppress(AttributeError, OSError):  # no affinity call on this platform
        cpus = min(cpus, len(os.sched_getaffinity(0)))
    return cpus


@dataclass(frozen=True)
class RuntimeConfig:
    """Thread counts and graph optimisation; 0 threads lets ORT choose."""

    intra_op_threads: int = 0
    inter_op_threads: int = 0
    optimisation: str = "all"
    prefer_cuda: bool = True
    spin: bool = False  # let idle ORT pool threads spin (ORT's default); see from_settings

    @classmethod
    def from_settings(cls, settings: Settings) -> RuntimeConfig:
        intra = settings.ort_intra_threads
        return cls(
            # unset: one thread per CPU of the container's quota (cgroups), else ORT's choice (0)
            intra_op_threads=intra if intra is not None else (container_cpu_limit() or 0),
            inter_op_threads=settings.ort_inter_threads,
            optimisation=settings.ort_optimisation,
            prefer_cuda=settings.prefer_cuda,
            # ORT's pool threads spin-wait between runs by default (session.intra_op.allow_spinning,
            # https://onnxruntime.ai/docs/performance/tune-performance/threading.html): free latency on
            # an idle many-core box, but on a busy or small one they burn the cores the HTTP path needs
            # (in our profile, half the CPU of a served request). Off unless DLBOOK_ORT_SPIN=1.
            spin=settings.ort_spin,
        )

    @classmethod
    def from_env(cls) -> RuntimeConfig:
        """``from_settings`` on the environment as it is now (scripts and tests; a service passes its own)."""
        return cls.from_settings(Settings.from_env())


class OnnxModel:
    """An ONNX graph ready to run; ``provider`` is what the session really uses."""

    def __init__(self, path: Path, config: RuntimeConfig | None = None) -> None:
        config = config or RuntimeConfig.from_env()
        self.path = path
        options = ort.SessionOptions()
        options.intra_op_num_threads = config.intra_op_threads
        options.inter_op_num_threads = config.inter_op_threads
        options.graph_optimization_level = _OPTIMISATION[config.optimisation]
        spin = "1" if config.spin else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        options.add_session_config_entry("session.inter_op.allow_spinning", spin)
        options.log_severity_level = 3  # errors only: no provider-fallback noise on CPU machines
        providers: list = ["CPUExecutionProvider"]
        if config.prefer_cuda and nvml_gpu_count() > 0 and "CUDAExecutionProvider" in ort.get_available_providers():
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.provider = self.session.get_providers()[0]
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, feeds)

    def warm_up(self, feeds: dict[str, np.ndarray], times: int = 3) -> None:
        """The first runs allocate and pick kernels; do them before the first request does."""
        for _ in range(times):
            self.run(feeds)
