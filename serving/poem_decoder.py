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

The protocol, pickled frames on stdin and stdout (the server is the only peer; stray prints go to
stderr, since fd 1 is redirected there once the frames' stream is taken):
- in: a setup dict (``graph``, ``tokens``, ``num_layers``, ``hidden_size``, ``max_batch``), then
  ``("add", id, plan, sampling parameters, seed)`` and ``("cancel", id)``; end of input ends the loop;
- out: ``("ready", provider)`` (or ``("unusable", why)`` and exit when the graph cannot be loaded),
  then per step ``("step", rows, seconds, [(id, token), …])``, and
  ``("failed", [ids], error name)`` when a step raised (those poems end; the loop goes on).
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
from serving.poem_sampling import PoemSampler, SamplingParams, advance_all
from serving.runtime import OnnxModel

logger = logging.getLogger(__name__)


@dataclass
class _Sequence:
    id: int
    sampler: PoemSampler
    hidden: np.ndarray  # [L, H]


def _read_commands(stream: BinaryIO, inbox: queue.SimpleQueue) -> None:
    """Commands from the server into ``inbox``; ``None`` once the server is gone."""
    try:
        while True:
            inbox.put(pickle.load(stream))
    except (EOFError, OSError, pickle.UnpicklingError):
        inbox.put(None)


class StepLoop:
    """Steps every live poem together, back to back, for as long as there is one."""

    def __init__(self, model: OnnxModel, vocab: Vocabulary, num_layers: int, hidden_size: int, max_batch: int,
                 send: Callable[[tuple], None]) -> None:
        self.model, self.vocab, self.send = model, vocab, send
        self.num_layers, self.hidden_size, self.max_batch = num_layers, hidden_size, max_batch
        self.live: list[_Sequence] = []
        self.waiting: deque[_Sequence] = deque()

    def _apply(self, command: tuple) -> None:
        if command[0] == "add":
            _, poem_id, plan, params, seed = command
            sampler = PoemSampler(plan, self.vocab, SamplingParams(*params), seed)
            self.waiting.append(_Sequence(poem_id, sampler, np.zeros((self.num_layers, self.hidden_size), np.float32)))
        elif command[0] == "cancel":
            self.live = [s for s in self.live if s.id != command[1]]
            self.waiting = deque(s for s in self.waiting if s.id != command[1])

    def _take_commands(self, inbox: queue.SimpleQueue) -> bool:
        """Apply what the server sent (waiting for it when nothing is live); False once it is gone."""
        commands = [] if self.live or self.waiting else [inbox.get()]
        while True:
            try:
                commands.append(inbox.get_nowait())
            except queue.Empty:
                break
        for command in commands:
            if command is None:
                return False
            self._apply(command)
        while self.waiting and len(self.live) < self.max_batch:
            self.live.append(self.waiting.popleft())
        return True

    def run(self, inbox: queue.SimpleQueue) -> None:
        while self._take_commands(inbox):
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
            self.send(("failed", [s.id for s in live], type(err).__name__))
            self.live = []
            return
        seconds = time.perf_counter() - began
        for i, s in enumerate(live):
            s.hidden = next_hidden[:, i]
        self.send(("step", len(live), seconds, [(s.id, s.sampler.tokens[-1]) for s in live]))
        self.live = [s for s in live if not s.sampler.done]


def main() -> None:
    # A graceful shutdown (SIGTERM) is the server's to run: it finishes the poems in flight, then closes
    # our input, which ends the loop. BentoML's process manager (circus) signals every child of a worker
    # too, which used to end the poems first (each stream got an ``error`` event during a drain); a
    # server that dies closes our input as well, so ignoring SIGTERM leaves no orphan.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    frames_in = sys.stdin.buffer
    frames_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed from here on goes to stderr, not into the frames
    setup = pickle.load(frames_in)
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    # Read commands while the model loads: the server may send poems at once (after a restart, say),
    # and a pipe nobody reads would block it once full.
    threading.Thread(target=_read_commands, args=(frames_in, inbox), daemon=True).start()

    def send(frame: tuple) -> None:
        pickle.dump(frame, frames_out, protocol=pickle.HIGHEST_PROTOCOL)
        frames_out.flush()

    vocab = Vocabulary(list(setup["tokens"]))
    num_layers, hidden_size = setup["num_layers"], setup["hidden_size"]
    try:
        model = OnnxModel(Path(setup["graph"]))
        model.warm_up({"token": np.array([vocab.bos_id], np.int64),
                       "hidden": np.zeros((num_layers, 1, hidden_size), np.float32)})
    except Exception as err:  # noqa: BLE001 - ORT's errors are not one class; the server reports it
        send(("unusable", f"ONNX Runtime cannot run {setup['graph']}: {type(err).__name__}: {err}"))
        raise SystemExit(1) from err
    send(("ready", model.provider))
    with contextlib.suppress(OSError):  # the server went away mid-step (a broken pipe)
        StepLoop(model, vocab, num_layers, hidden_size, setup["max_batch"], send).run(inbox)


if __name__ == "__main__":
    main()
