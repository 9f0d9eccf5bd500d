"""One small ONNX Runtime wrapper: CUDA when a GPU is really there, else CPU, and say which.

``onnxruntime-gpu`` on a machine without a GPU accepts ``CUDAExecutionProvider``, logs an error per
session and silently falls back to CPU, while ``get_available_providers()`` still lists CUDA. So we
ask NVML whether a GPU exists before requesting CUDA, keep ORT's logger quiet while the session is
created, and report the provider the session actually got.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import onnxruntime as ort

_OPTIMISATION = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@cache
def gpu_present() -> bool:
    """True when NVML finds at least one NVIDIA GPU; False on any failure (no driver, no library)."""
    if os.environ.get("DLBOOK_DEVICE", "auto") == "cpu":
        return False
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return pynvml.nvmlDeviceGetCount() > 0
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - any NVML failure means "no usable GPU"
        return False


@dataclass(frozen=True)
class RuntimeConfig:
    """Thread counts and graph optimisation; 0 threads lets ORT choose."""

    intra_op_threads: int = 0
    inter_op_threads: int = 0
    optimisation: str = "all"
    prefer_cuda: bool = True
    spin: bool = False  # let idle ORT pool threads spin (ORT's default); see from_env

    @classmethod
    def from_env(cls) -> RuntimeConfig:
        return cls(
            intra_op_threads=int(os.environ.get("DLBOOK_ORT_INTRA_THREADS", "0")),
            inter_op_threads=int(os.environ.get("DLBOOK_ORT_INTER_THREADS", "0")),
            optimisation=os.environ.get("DLBOOK_ORT_OPTIMISATION", "all"),
            prefer_cuda=os.environ.get("DLBOOK_DEVICE", "auto") != "cpu",
            # ORT's pool threads spin-wait between runs by default: free latency on an idle many-core
            # box, but on a busy or small one they burn the cores the HTTP path needs (in our
            # profile, half the CPU of a served request). Off unless DLBOOK_ORT_SPIN=1.
            spin=os.environ.get("DLBOOK_ORT_SPIN", "0") == "1",
        )


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
        if config.prefer_cuda and gpu_present() and "CUDAExecutionProvider" in ort.get_available_providers():
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
