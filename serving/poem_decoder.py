"""The poem decoding loop, run in a process of its own (``python -m serving.poem_decoder``).

Every live poem advances one token per model step: the loop gathers them into one
``(token[B], hidden[L,B,H])`` call of the exported step graph, hands each row of logits to its
sampler (all rows together, see ``advance_all``) and reports the chosen token ids. Poems join and
leave between steps, so sixteen concurrent requests cost about one batch-16 step per token instead
of sixteen batch-1 steps.

Why a process and not a thread of the server: the loop's Python (sampling is dozens of small numpy
calls per step) and the server's event loop took turns at one GIL. Measured here, a thread busy with
Python 30% of the time slowed the step loop by 23% (6,378 → 4,928 and 7,008 → 5,404 characters/s at
batch 16), while a process doing the same work beside it cost 0–17%; in the server the step took
2.8 ms against 2.3 ms alone. The server's side is :class:`serving.poem_engine.PoemEngine`.

The messages, their order and what happens on failure and shutdown are in
:mod:`serving.poem_protocol`. Stray prints go to stderr: fd 1 is redirected there once the messages'
stream is taken.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import queue
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from preprocessing import Vocabulary
from serving.poem_protocol import (
    AddPoem,
    CancelPoem,
    Draining,
    FromDecoder,
    Kind,
    Ready,
    Setup,
    Step,
    StepFailed,
    ToDecoder,
    Unusable,
)
from serving.poem_sampling import PoemSampler, advance_all
from serving.prosody import PoemProsody, SoundTable
from serving.runtime import OnnxModel

logger = logging.getLogger(__name__)


class _Signalled:
    """Put in the inbox by the SIGTERM handler: the loop, not the handler, tells the server (a handler
    that wrote to the pipe could cut into a message the loop was writing)."""


_SIGNALLED = _Signalled()


@dataclass
class _Sequence:
    id: int
    sampler: PoemSampler
    hidden: np.ndarray  # [L, H]


def _read_messages(stream: BinaryIO, inbox: queue.SimpleQueue) -> None:
    """Messages from the server into ``inbox``; ``None`` once the server is gone."""
    try:
        while True:
            inbox.put(pickle.load(stream))
    except (EOFError, OSError, pickle.UnpicklingError):
        inbox.put(None)


class StepLoop:
    """Steps every live poem together, back to back, for as long as there is one."""

    def __init__(self, model: OnnxModel, vocab: Vocabulary, num_layers: int, hidden_size: int, max_batch: int,
                 send: Callable[[FromDecoder], None], sounds: SoundTable | None = None) -> None:
        """``sounds``: the model's 平水韵 table, built once (rhyme and tone constraints need it)."""
        self.model, self.vocab, self.send, self.sounds = model, vocab, send, sounds
        self.num_layers, self.hidden_size, self.max_batch = num_layers, hidden_size, max_batch
        self.live: list[_Sequence] = []
        self.waiting: deque[_Sequence] = deque()
        self.draining = False  # SIGTERM came: the server was told
        self.retired = False  # the server sends no more poems: exit once those held are written

    def _apply(self, message: ToDecoder | _Signalled) -> None:
        if message is _SIGNALLED:
            if not self.draining:
                self.draining = True
                self.send(Draining())
            return
        assert not isinstance(message, _Signalled)
        if message.kind is Kind.ADD_POEM:
            assert isinstance(message, AddPoem)
            plan = list(message.plan)
            sampler = PoemSampler(plan, self.vocab, message.params, message.seed)
            if message.prosody is not None and message.prosody.active:
                # the server refused what cannot be met (no tables, a plan no pattern fits); should a
                # peer send it anyway, that poem fails, not the loop
                try:
                    if self.sounds is None or message.form is None:
                        raise LookupError("rhyme or tones asked of a model without sound tables")
                    sampler.constraint = PoemProsody(self.sounds, message.form, plan, message.prosody)
                except Exception as err:  # noqa: BLE001 - reported to the server as the poem's failure
                    logger.exception("poem %s: its rhyme and tone constraint cannot be built", message.poem_id)
                    self.send(StepFailed((message.poem_id,), type(err).__name__))
                    return
            self.waiting.append(_Sequence(message.poem_id, sampler,
                                          np.zeros((self.num_layers, self.hidden_size), np.float32)))
        elif message.kind is Kind.CANCEL_POEM:
            assert isinstance(message, CancelPoem)
            self.live = [s for s in self.live if s.id != message.poem_id]
            self.waiting = deque(s for s in self.waiting if s.id != message.poem_id)
        elif message.kind is Kind.RETIRE:
            self.retired = True
        else:
            logger.error("the poem decoder got a message it does not take: %r", message)

    def _take_messages(self, inbox: queue.SimpleQueue) -> bool:
        """Apply what the server sent (waiting for it when nothing is live); False once it is gone,
        or once it retired this process and every poem held is written."""
        if self.retired and not (self.live or self.waiting):
            return False  # nothing will come: waiting for a message here would never end
        messages = [] if self.live or self.waiting else [inbox.get()]
        while True:
            try:
                messages.append(inbox.get_nowait())
            except queue.Empty:
                break
        for message in messages:
            if message is None:
                return False
            self._apply(message)
        while self.waiting and len(self.live) < self.max_batch:
            self.live.append(self.waiting.popleft())
        return not (self.retired and not self.live)

    def run(self, inbox: queue.SimpleQueue) -> None:
        while self._take_messages(inbox):
            if self.live:
                self._step()

    def _step(self) -> None:
        live = self.live
        tokens = np.array([s.sampler.next_input for s in live], dtype=np.int64)
        hidden = np.ascontiguousarray(np.stack([s.hidden for s in live], axis=1))
        began = time.perf_counter()
        try:
            logits, next_hidden = self.model.run({"token": tokens, "hidden": hidden})
            advance_all([s.sampler for s in live], logits)
        except Exception as err:  # noqa: BLE001 - fail the poems in flight, keep serving
            logger.exception("poem decoding step failed")
            self.send(StepFailed(tuple(s.id for s in live), type(err).__name__))
            self.live = []
            return
        seconds = time.perf_counter() - began
        for i, s in enumerate(live):
            s.hidden = next_hidden[:, i]
        self.send(Step(len(live), seconds, tuple(s.id for s in live), tuple(s.sampler.tokens[-1] for s in live)))
        self.live = [s for s in live if not s.sampler.done]


def main() -> None:
    frames_in = sys.stdin.buffer
    frames_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed from here on goes to stderr, not into the messages
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    # SIGTERM drains (see serving.poem_protocol); so does SIGINT, which Ctrl-C sends the whole process
    # group, server included. SimpleQueue.put is safe to call from a signal handler.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: inbox.put(_SIGNALLED))
    setup = pickle.load(frames_in)
    if not isinstance(setup, Setup):
        raise SystemExit(f"the poem decoder expects Setup first, got {type(setup).__name__}")
    # Read messages while the model loads: the server may send poems at once (after a restart, say),
    # and a pipe nobody reads would block it once full.
    threading.Thread(target=_read_messages, args=(frames_in, inbox), daemon=True).start()

    def send(message: FromDecoder) -> None:
        pickle.dump(message, frames_out, protocol=pickle.HIGHEST_PROTOCOL)
        frames_out.flush()

    vocab = Vocabulary(list(setup.tokens))
    try:
        model = OnnxModel(Path(setup.graph))
        model.warm_up({"token": np.array([vocab.bos_id], np.int64),
                       "hidden": np.zeros((setup.num_layers, 1, setup.hidden_size), np.float32)})
    except Exception as err:  # noqa: BLE001 - ORT's errors are not one class; the server reports it
        send(Unusable(f"ONNX Runtime cannot run {setup.graph}: {type(err).__name__}: {err}"))
        sys.stderr.flush()
        os._exit(1)  # as at the end: the reader thread holds stdin's lock
    sounds = SoundTable(setup.prosody, setup.tokens) if setup.prosody else None  # once, before the first poem
    send(Ready(model.provider))
    with contextlib.suppress(OSError):  # the server went away mid-step (a broken pipe)
        StepLoop(model, vocab, setup.num_layers, setup.hidden_size, setup.max_batch, send, sounds).run(inbox)
        frames_out.flush()
    # Not a normal interpreter exit: after Retire the server is still connected, and the thread reading
    # our input sits in a read holding stdin's lock, which shutdown then tries to take and aborts on
    # ("could not acquire lock for <stdin> at interpreter shutdown", status -6). Nothing is left to clean up.
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
