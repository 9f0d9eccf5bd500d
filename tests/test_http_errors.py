"""Units of the HTTP guard's helpers: request ids, metric labels, which failures reach the error log."""

from __future__ import annotations

import asyncio
import logging
import selectors
import sys

import pydantic
from bentoml.exceptions import BadInput, InternalServerError

from serving.errors import ClientErrorLogFilter
from serving.guard import request_id_for
from serving.routes import route_label


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


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop on a clock that moves only when told: waiting for the next timer jumps the clock
    to it at once, and ``block(s)`` stands for s seconds of work that never yields. What LoopLag then
    measures follows from the scenario alone, not from how fast or how busy this machine is."""

    def __init__(self) -> None:
        self.now = 0.0
        super().__init__(selector=_JumpingSelector(self))

    def time(self) -> float:
        return self.now

    def block(self, seconds: float) -> None:
        self.now += seconds


class _JumpingSelector(selectors.DefaultSelector):
    def __init__(self, loop: VirtualTimeLoop) -> None:
        super().__init__()
        self.loop = loop

    def select(self, timeout: float | None = None) -> list:
        if timeout is None:  # no timer pending: a real wait for I/O
            return super().select(None)
        events = super().select(0)
        if not events and timeout > 0:
            self.loop.now += timeout  # nothing to do until the next timer: skip to it
        return events


def test_loop_lag_rises_while_the_loop_is_blocked_and_falls_after() -> None:
    """The shedding signal: a loop busy with queued work runs its timers late, an idle one on time.

    On a virtual clock, so nothing here depends on this machine's speed; the same scenario on a real
    loop, with its figures printed, is ``loadtests/event_loop_lag.py``.
    """
    from serving.admission import LoopLag

    async def scenario() -> tuple[float, float, float]:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, VirtualTimeLoop)
        lag = LoopLag()
        lag.ensure_running()
        await asyncio.sleep(0.1)  # idle: every timer on time
        before = lag.lag_s
        for _ in range(10):  # ten rounds of 40 ms of work that never yields: a saturated worker
            loop.block(0.04)
            await asyncio.sleep(0)
        busy = lag.lag_s
        await asyncio.sleep(0.3)
        return before, busy, lag.lag_s

    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        before, busy, idle = runner.run(scenario())
    # Each late sample waited out at least one 40 ms block past its 5 ms period (35 ms late); the
    # smoothed figure after the busy rounds is most of that, and decays to nothing once idle.
    assert before == 0.0, before
    assert busy > 0.02, busy
    assert idle < 1e-6, idle


def test_shed_requests_are_logged_as_a_summary_with_their_count_and_last_id(caplog) -> None:
    from serving.guard import ShedLog

    shed_log = ShedLog(period_s=3600)  # the periods are ended by hand below: no clock in this test

    async def burst() -> None:
        for i in range(5):
            shed_log.note("/classify_pixels", f"id{i}")
        shed_log.note("/wp-login.php", "id5")
        shed_log._flush_later()  # the period ends: the rest are summed into one line
        shed_log.note("/classify_pixels", "id6")  # still shedding: summed into the next period's line
        shed_log._flush_later()
        shed_log._flush_later()  # a quiet period: nothing to say, and the next shed is logged at once
        shed_log.note("/classify_pixels", "id7")

    with caplog.at_level(logging.WARNING, logger="dlbook.serving"):
        asyncio.run(burst())
    lines = [r.getMessage() for r in caplog.records if r.name == "dlbook.serving"]
    assert len(lines) == 4, lines
    assert lines[0].startswith("shed 1 request at capacity") and "[last request id0]" in lines[0]
    assert "shed 5 requests" in lines[1] and "/classify_pixels 4" in lines[1] and "other 1" in lines[1]
    assert "[last request id5]" in lines[1]
    assert lines[2].startswith("shed 1 request at capacity") and "[last request id6]" in lines[2]
    assert lines[3].startswith("shed 1 request at capacity") and "[last request id7]" in lines[3]
