"""Units of the HTTP guard's helpers: request ids, metric labels, which failures reach the error log."""

from __future__ import annotations

import logging
import sys

import pydantic
from bentoml.exceptions import BadInput, InternalServerError

from serving.http_errors import ClientErrorLogFilter, request_id_for, route_label


def _record(error: BaseException) -> logging.LogRecord:
    try:
        raise error
    except BaseException:  # noqa: BLE001 - we want the exc_info of exactly this error
        info = sys.exc_info()
    return logging.LogRecord("bentoml._internal.server.http_app", logging.ERROR, __file__, 1,
                             "Exception on %s [%s]", ("/predict_price", "POST"), info)


def test_client_mistakes_leave_the_error_log_and_server_faults_stay() -> None:
    class Body(pydantic.BaseModel):
        n: int

    try:
        Body.model_validate({"n": "many"})
    except pydantic.ValidationError as err:
        invalid = err
    keep = ClientErrorLogFilter().filter
    assert not keep(_record(invalid))
    assert not keep(_record(BadInput("Invalid JSON input")))
    assert keep(_record(InternalServerError("model crashed")))
    assert keep(_record(RuntimeError("a bug of ours")))
    assert keep(logging.LogRecord("x", logging.ERROR, __file__, 1, "no exception", (), None))


def test_request_ids_take_a_sane_client_id_or_make_one() -> None:
    assert request_id_for({b"x-request-id": b"trace-7.a:b_c"}) == "trace-7.a:b_c"
    for hostile in (b"", b"a b", b"x" * 65, b"id\r\nSet-Cookie: x", "é".encode()):
        made = request_id_for({b"x-request-id": hostile})
        assert len(made) == 16 and made.isalnum()


def test_metric_labels_are_bounded_to_known_routes() -> None:
    assert route_label("/classify") == "/classify"
    assert route_label("/wp-admin/setup.php") == "other"


def test_loop_lag_rises_while_the_loop_is_blocked_and_falls_after() -> None:
    """The shedding signal: a loop busy with queued work runs its timers late, an idle one on time."""
    import asyncio
    import time

    from serving.admission import LoopLag

    async def scenario() -> tuple[float, float]:
        lag = LoopLag()
        lag.ensure_running()
        for _ in range(10):  # ten rounds of 40 ms of work that never yields: a saturated worker
            time.sleep(0.04)
            await asyncio.sleep(0)
        busy = lag.lag_s
        await asyncio.sleep(0.3)
        return busy, lag.lag_s

    busy, idle = asyncio.run(scenario())
    assert busy > 0.02, busy
    assert idle < 0.005, idle
