"""Triton peer: the exported fashion-lenet ONNX graph behind NVIDIA's Triton Inference Server, via PyTriton.

Runs in its own virtualenv (see :mod:`loadtests.peers.venvs`), never in the project's: PyTriton pins
its own numpy and bundles a ``tritonserver`` binary with the Python backend. Triton's dynamic batcher
gathers concurrent KServe-v2 requests into one batch; the Python callable below scales the pixels
exactly as the model's ``meta.json`` says (the same formula as ``preprocessing.PixelScaling``, copied
here because the project's packages are not installed in this venv) and runs ONNX Runtime on the
batch, returning softmax probabilities so the benchmark can check the answer against ours.

    .venvs/triton/bin/python loadtests/peers/triton_server.py --model-dir /tmp/bhome/models/fashion-lenet/<v> \
        --port 8000 --threads 2

Request: ``POST /v2/models/fashion-lenet/infer`` with
``{"inputs": [{"name": "image", "shape": [1, 28, 28], "datatype": "UINT8", "data": [...784 values...]}]}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
from pathlib import Path

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig


def scale_pixels(raw: np.ndarray, scaling: dict) -> np.ndarray:
    """meta.json's ``preprocessing.scaling``: raw x, unit x/255, normalize (x/255 - mean)/std, in float32."""
    x = np.asarray(raw, dtype=np.float32)
    if scaling["kind"] == "raw":
        return x
    x = x / np.float32(255.0)
    if scaling["kind"] == "normalize":
        x = (x - np.float32(scaling["mean"])) / np.float32(scaling["std"])
    return x


def make_infer(model_dir: Path, threads: int):
    """The batched callable Triton calls: images [B, 28, 28] (any numeric dtype) → probabilities [B, 10]."""
    meta = json.loads((model_dir / "meta.json").read_text())
    scaling = meta["preprocessing"]["scaling"]
    row_shape = tuple(meta["io"]["inputs"][0]["shape"][1:])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    @batch
    def infer(image: np.ndarray) -> dict[str, np.ndarray]:
        x = scale_pixels(image, scaling).reshape(len(image), *row_shape)
        logits = session.run(None, {input_name: x})[0]
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return {"probabilities": (e / e.sum(axis=1, keepdims=True)).astype(np.float32)}

    # First runs allocate and pick kernels; do them before the first request, as our service does.
    for size in (1, 8, 32):
        infer.__wrapped__(image=np.zeros((size, 28, 28), np.uint8))
    return infer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, required=True, help="folder with model.onnx and meta.json")
    parser.add_argument("--name", default="fashion-lenet", help="model name in Triton's URLs")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (gRPC and metrics get port+1, +2)")
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-queue-delay-us", type=int, default=100, help="dynamic batcher wait for more requests")
    parser.add_argument("--instances", type=int, default=1, help="model instances (one Python backend stub each)")
    parser.add_argument("--workspace", type=Path, help="PyTriton's workspace (default: a new one in ~/.cache/pytriton)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    # SIGTERM (how the benchmark stops its servers) ends serve() like Ctrl-C does, so PyTriton stops
    # tritonserver and deletes its workspace instead of dying mid-way and leaving both behind.
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    config = TritonConfig(http_address="127.0.0.1", http_port=args.port, grpc_address="127.0.0.1",
                          grpc_port=args.port + 1, metrics_address="127.0.0.1", metrics_port=args.port + 2,
                          allow_metrics=False, log_verbose=0)
    with Triton(config=config, workspace=args.workspace) as triton:
        # A list of callables is PyTriton's way to ask for several model instances.
        infer = [make_infer(args.model_dir, args.threads) for _ in range(args.instances)]
        triton.bind(model_name=args.name, infer_func=infer if args.instances > 1 else infer[0],
                    inputs=[Tensor(name="image", dtype=np.uint8, shape=(28, 28))],
                    outputs=[Tensor(name="probabilities", dtype=np.float32, shape=(10,))],
                    config=ModelConfig(max_batch_size=args.max_batch,
                                       batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us)),
                    strict=True)
        triton.serve()


if __name__ == "__main__":
    main()
