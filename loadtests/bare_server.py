"""The baseline for the HTTP benchmarks: the same exported model behind a bare Starlette endpoint.

No BentoML, no validation beyond what decoding needs, no batching, no metrics: one uvicorn process
that decodes the request, runs ONNX Runtime and answers top-3 as JSON. What our service does beyond
this is what the served/bare ratio prices.

    python loadtests/bare_server.py --model fashion-lenet --port 3100
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import bentoml
import numpy as np
import onnxruntime as ort
import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from preprocessing import PixelScaling


def build_app(model_dir: Path, intra_threads: int = 0, spin: bool = False) -> Starlette:
    meta = json.loads((model_dir / "meta.json").read_text())
    scaling = PixelScaling.from_dict(meta["preprocessing"]["scaling"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    session = ort.InferenceSession(str(model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    row_shape = tuple(meta["io"]["inputs"][0]["shape"][1:])  # (1, 28, 28) for LeNet, (784,) for MLPs

    def scale(raw: np.ndarray) -> np.ndarray:
        return scaling.apply(raw).astype(np.float32)

    def answer(frames: np.ndarray) -> JSONResponse:
        logits = session.run(None, {input_name: scale(frames).reshape(len(frames), *row_shape)})[0]
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = e / e.sum(axis=1, keepdims=True)
        top = np.argsort(-probs, axis=1)[:, :3]
        return JSONResponse({"predictions": [{"top": [{"class": int(c), "p": float(p[c])} for c in t]}
                                             for p, t in zip(probs, top, strict=True)]})

    async def classify(request: Request) -> Response:
        form = await request.form()
        upload = form["images"]
        image = Image.open(io.BytesIO(await upload.read())).convert("L").resize((28, 28))
        return answer(np.asarray(image)[None])

    async def classify_pixels(request: Request) -> Response:
        body = await request.json()
        return answer(np.asarray(body["images"], np.float32).reshape(-1, 28, 28))

    return Starlette(routes=[Route("/classify", classify, methods=["POST"]),
                             Route("/classify_pixels", classify_pixels, methods=["POST"]),
                             Route("/livez", lambda _: Response("ok"), methods=["GET"])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fashion-lenet", help="exported model name in the BentoML store")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3100)
    parser.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: ORT chooses)")
    parser.add_argument("--spin", action="store_true", help="let ORT pool threads spin (ORT's default; ours: off)")
    args = parser.parse_args()
    app = build_app(Path(bentoml.models.get(f"{args.model}:latest").path), args.threads, args.spin)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
