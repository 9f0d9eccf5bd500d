"""The upstream facts our workarounds rest on, checked against the installed packages.

Each workaround names the condition for deleting it (see its comment). Where that condition is a
fact of an installed package that a test can read cheaply, it is checked here, so an upgrade that
makes a workaround unnecessary fails this file and says which workaround to delete.
"""

from __future__ import annotations

import pytest


def test_ort_integer_quantiser_still_skips_gemm_and_gru() -> None:
    """``training/quantize.py`` rewrites ``Gemm`` as ``MatMul`` + ``Add`` and leaves ``GRU`` float
    because ORT's dynamic (integer-op) quantiser has neither (microsoft/onnxruntime issues 2340 and
    9796). When this fails, ORT quantises that op itself: delete ``gemm_as_matmul`` (Gemm), or let
    the poem model's GRU be quantised (GRU)."""
    registry = pytest.importorskip("onnxruntime.quantization.registry")
    ops = set(registry.IntegerOpsRegistry)
    assert {"MatMul", "Gather"} <= ops, ops  # what the default scheme relies on
    assert "Gemm" not in ops, "ORT now quantises Gemm: delete training.quantize.gemm_as_matmul"
    assert "GRU" not in ops, "ORT now quantises GRU: revisit the poem model's float GRU (training/quantize.py)"


def test_the_request_guard_is_the_app_bentomls_worker_hands_to_uvicorn() -> None:
    """``serving.guard.stand_in_front`` relies on BentoML's worker building its app with
    ``service.to_asgi()``; when that changes, the guard silently falls out of the request path."""
    import inspect

    import _bentoml_impl.worker.service as worker

    from serving.guard import RequestGuardMiddleware
    from serving.service import ImageService

    assert "service.to_asgi(" in inspect.getsource(worker)
    app = ImageService.to_asgi(is_main=True)
    assert isinstance(app, RequestGuardMiddleware)
    assert type(app.app).__name__ == "Starlette"  # BentoML's own app, with its middleware, behind the guard
