"""Continuous batching for poem generation, the server's side: poems go to a decoding process,
their characters come back to each poem's event loop.

The decoding loop itself (every live poem advances one token per model step, poems join and leave
between steps) is :mod:`serving.poem_decoder`, in a process of its own so that its Python and the
event loop's never wait for each other's GIL (the measurement is in that module). Here:
:class:`PoemEngine` starts that process (``python -m serving.poem_decoder``), sends it each poem
(plan, sampling parameters, seed) and each cancellation, and a reader thread takes each step's token
ids, advances the poem's own :class:`PoemSampler` with them (so ``sampler.text`` and ``sampler.done``
hold in the server too) and posts the characters to each poem's event loop in one
``call_soon_threadsafe`` per loop per step. The messages, and what happens when the decoding process
dies or is asked to stop, are in :mod:`serving.poem_protocol`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import pickle
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from preprocessing import Vocabulary
from serving.poem_protocol import (
    AddPoem,
    CancelPoem,
    FromDecoder,
    Kind,
    Ready,
    Retire,
    Setup,
    Step,
    StepFailed,
    ToDecoder,
    Unusable,
)
from serving.poem_sampling import PoemSampler

StepObserver = Callable[[int, float], None]  # (batch size, seconds) after every step

logger = logging.getLogger(__name__)

# The decoder's working directory: ``python -m`` puts it first on sys.path, so ``serving`` and
# ``preprocessing`` import from the same code as the server's, installed or not.
_REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 120.0


class DecoderStopped(RuntimeError):
    """The decoding process died while it held the poem: a fault of the moment, worth a retry (the
    next poem starts a new process), unlike a step that raised."""

    def __init__(self) -> None:
        super().__init__("generation failed: the decoding process stopped")


class _Mailbox:
    """What the decoding process has written for one poem and its reader has not taken yet.

    Lives on the poem's event loop (the reader thread reaches it through ``call_soon_threadsafe``).
    Why not an ``asyncio.Queue`` of characters: each character would wake the reading task, and a
    stream that writes every 20 ms anyway paid for ~15 wake-ups per write. Here a reader that has
    something to send but is not due yet sleeps until it is, however many characters arrive, while
    the end of the poem (or a failure) always wakes it at once.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.chars: list[str] = []
        self.finished = False
        self.failure: BaseException | None = None
        self._waiter: asyncio.Future | None = None
        self._wake_on_char = True

    def put(self, item: object) -> None:
        """A character, ``None`` (the poem is whole) or an exception (it failed); on the loop."""
        if item is None:
            self.finished = True
        elif isinstance(item, BaseException):
            if self.finished:  # a deadline that fires in the same turn as the end: the poem is whole
                return
            self.failure = self.failure or item
        else:
            self.chars.append(item)  # type: ignore[arg-type]
            if not self._wake_on_char:
                return
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def take(self, not_before: float) -> list[str] | None:
        """Every character written since the last take; ``None`` once the poem is whole and all was
        taken. Waits for a character, and holds what it has until ``not_before`` (loop time) unless
        the poem ends first. After a failure, every character written so far is handed over, then
        the failure is raised."""
        while True:
            ended = self.finished or self.failure is not None
            if self.chars and (ended or self.loop.time() >= not_before):
                taken, self.chars = self.chars, []
                return taken
            if ended:
                if self.failure is not None:
                    raise self.failure
                return None
            self._waiter = self.loop.create_future()
            timer = None
            early = self.loop.time() < not_before
            self._wake_on_char = not early
            if early:
                timer = self.loop.call_at(not_before, self._wake)
            try:
                await self._waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()


@dataclass
class _Live:
    sampler: PoemSampler
    mailbox: _Mailbox
    whole: bool  # the reader wants only the finished poem: no character is posted before it
    decoder: _DecoderProcess


def _deliver(items: list[tuple[_Mailbox, object]]) -> None:
    """Runs on a poem's event loop: one call per step carries every character that loop is owed."""
    for mailbox, item in items:
        mailbox.put(item)


class _DecoderProcess:
    """One ``serving.poem_decoder`` process, the pipe to it, and the thread reading its messages."""

    def __init__(self, setup: Setup, on_message: Callable[[_DecoderProcess, FromDecoder], None],
                 on_exit: Callable[[_DecoderProcess], None]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "serving.poem_decoder"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, cwd=_REPO)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._to_child: BinaryIO = self.proc.stdin
        self._writing = threading.Lock()
        self.ready = threading.Event()
        self.provider = ""
        self.unusable = ""  # why the process could not load its graph, when it could not
        self._on_message, self._on_exit = on_message, on_exit
        self.send(setup)
        threading.Thread(target=self._read_forever, args=(self.proc.stdout,), name="poem-decoder-reader",
                         daemon=True).start()

    def send(self, message: ToDecoder) -> bool:
        """Write one message to the decoding process; False when it is gone."""
        try:
            with self._writing:
                pickle.dump(message, self._to_child, protocol=pickle.HIGHEST_PROTOCOL)
                self._to_child.flush()
            return True
        except (BrokenPipeError, OSError, ValueError):
            return False

    def _read_forever(self, frames: BinaryIO) -> None:
        try:
            while True:
                message: FromDecoder = pickle.load(frames)
                if message.kind is Kind.READY:
                    assert isinstance(message, Ready)
                    self.provider = message.provider
                    self.ready.set()
                elif message.kind is Kind.UNUSABLE:
                    assert isinstance(message, Unusable)
                    self.unusable = message.reason
                else:
                    self._on_message(self, message)
        except (EOFError, OSError, pickle.UnpicklingError):
            pass
        except Exception:  # a bug here must not leave poems waiting for ever
            logger.exception("reading the poem decoder's messages failed")
        self.ready.set()
        with contextlib.suppress(OSError):
            self._to_child.close()
        self.proc.wait()
        logger.log(logging.INFO if self.proc.returncode == 0 else logging.WARNING,
                   "the poem decoding process %s exited with %s", self.proc.pid, self.proc.returncode)
        self._on_exit(self)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self._to_child.close()  # end of input ends the decoding loop
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class PoemEngine:
    """Poems through the decoding process: ``chunks`` for streams, ``generate`` for whole poems."""

    def __init__(self, graph: Path, vocab: Vocabulary, num_layers: int, hidden_size: int, max_batch: int = 64,
                 observe_step: StepObserver | None = None, prosody: dict[str, Any] | None = None) -> None:
        """``prosody``: the model's 平水韵 tables (its meta's ``prosody``), for poems with rhyme or tones."""
        self._setup = Setup(str(graph), tuple(vocab.tokens), num_layers, hidden_size, max_batch, prosody)
        self.observe_step = observe_step
        self._ids = itertools.count()
        self._live: dict[int, _Live] = {}
        # _live, _decoder and _retired: the event loops and the reader threads share them
        self._lock = threading.Lock()
        self._decoder: _DecoderProcess | None = None
        self._retired: set[_DecoderProcess] = set()  # draining after SIGTERM: they finish their poems, then exit

    def _running_decoder(self) -> _DecoderProcess:
        """The decoding process, started if none is running. Not waited for: messages sent before it
        has loaded its model wait in the pipe."""
        with self._lock:
            return self._current_decoder()

    def _current_decoder(self) -> _DecoderProcess:
        """:meth:`_running_decoder` for a caller that holds the lock."""
        if self._decoder is None or not self._decoder.alive:
            self._decoder = _DecoderProcess(self._setup, self._on_message, self._on_exit)
        return self._decoder

    def start(self) -> str:
        """Start the decoding process and wait until its model is loaded (the service does this at
        start-up, so no request waits for it); the provider it runs on."""
        decoder = self._running_decoder()
        if not decoder.ready.wait(START_TIMEOUT_S) or not decoder.provider:
            self.stop()  # one that hangs in start-up must not outlive the refusal
            raise RuntimeError(decoder.unusable or "the poem decoding process did not start (its error is in the log)")
        return decoder.provider

    def stop(self) -> None:
        """End every decoding process now (closing its input); poems still in flight fail."""
        with self._lock:
            decoders = [d for d in (self._decoder, *self._retired) if d is not None]
            self._decoder = None
            self._retired.clear()
        for decoder in decoders:
            decoder.stop()

    def _on_message(self, decoder: _DecoderProcess, message: FromDecoder) -> None:
        """On a reader thread: advance each poem's sampler and post what its reader is owed."""
        out: list[tuple[_Live, object]] = []
        if message.kind is Kind.STEP:
            assert isinstance(message, Step)
            if self.observe_step:
                self.observe_step(message.rows, message.seconds)
            with self._lock:
                for poem_id, token in zip(message.poem_ids, message.tokens, strict=True):
                    live = self._live.get(poem_id)
                    if live is None:  # cancelled while the step ran
                        continue
                    char = live.sampler.accept(token)
                    if not live.whole:
                        out.append((live, char))
                    if live.sampler.done:
                        out.append((live, None))
                        del self._live[poem_id]
        elif message.kind is Kind.STEP_FAILED:
            assert isinstance(message, StepFailed)
            with self._lock:
                out = [(live, RuntimeError(f"generation failed: {message.error}"))
                       for live in (self._live.pop(i, None) for i in message.poem_ids) if live is not None]
        elif message.kind is Kind.DRAINING:
            # SIGTERM reached the decoder: poems from now on go to a new one; this one writes what it
            # holds (Retire tells it nothing follows) and exits
            with self._lock:
                if self._decoder is decoder:
                    self._decoder = None
                self._retired.add(decoder)
                decoder.send(Retire())
            logger.info("the poem decoding process %s is draining (SIGTERM); new poems go to a new one",
                        decoder.proc.pid)
        else:
            logger.error("unexpected message from the poem decoder: %r", message)
        self._post(out)

    def _on_exit(self, decoder: _DecoderProcess) -> None:
        """A decoding process is gone: the poems it held fail; the next poem starts a new one."""
        with self._lock:
            self._retired.discard(decoder)
            failed = [i for i, live in self._live.items() if live.decoder is decoder]
            lost = [self._live.pop(i) for i in failed]
        self._post([(live, DecoderStopped()) for live in lost])

    @contextlib.contextmanager
    def _enrolled(self, sampler: PoemSampler, deadline: float | None, whole: bool) -> Iterator[_Mailbox]:
        """Hand ``sampler`` to the decoding process; its mailbox while the caller reads. Leaving (the
        poem read, the client gone or out of time) takes the poem out of the batch.

        ``deadline`` (event-loop time) ends the poem with ``TimeoutError``: one timer per poem, where
        ``asyncio.wait_for`` around each read would create a task per read.
        """
        if sampler.tokens:
            raise ValueError("a sampler goes to the engine before its first token")
        loop = asyncio.get_running_loop()
        poem_id = next(self._ids)
        form, prosody = sampler.constraint_spec or (None, None)
        message = AddPoem(poem_id, tuple(sampler.plan), sampler.params, sampler.seed, form, prosody)
        with self._lock:  # as the Draining handler's Retire: no poem is sent to a decoder after its Retire
            decoder = self._current_decoder()
            live = _Live(sampler, _Mailbox(loop), whole, decoder)
            self._live[poem_id] = live
            sent = decoder.send(message)
        timer = None if deadline is None else loop.call_at(deadline, live.mailbox.put, TimeoutError())
        if not sent:
            live.mailbox.put(DecoderStopped())
        try:
            yield live.mailbox
        finally:
            if timer is not None:
                timer.cancel()
            with self._lock:
                still_live = self._live.pop(poem_id, None) is not None
            if still_live:
                decoder.send(CancelPoem(poem_id))

    async def chunks(self, sampler: PoemSampler, deadline: float | None = None, every_s: float = 0.0
                     ) -> AsyncIterator[list[str]]:
        """The characters of one poem as the decoding process writes them, in lists: each holds all
        written since the one before, at most one list every ``every_s`` seconds (the first at once,
        the last as soon as the poem ends). A stream that writes each list out thus costs one wake-up
        per write, not one per character."""
        loop = asyncio.get_running_loop()
        with self._enrolled(sampler, deadline, whole=False) as mailbox:
            not_before = -float("inf")
            while (chars := await mailbox.take(not_before)) is not None:
                yield chars
                not_before = loop.time() + every_s

    async def generate(self, sampler: PoemSampler, deadline: float | None = None) -> str:
        """The whole poem; nothing is posted for it until it is finished."""
        with self._enrolled(sampler, deadline, whole=True) as mailbox:
            while await mailbox.take(-float("inf")) is not None:  # no characters come: only the end
                pass
        return sampler.text

    @staticmethod
    def _post(items: list[tuple[_Live, object]]) -> None:
        """Hand characters to their poems' event loops: one thread-safe call per loop per step."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Mailbox, object]]] = {}
        for live, item in items:
            by_loop.setdefault(live.mailbox.loop, []).append((live.mailbox, item))
        for loop, batch in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop has closed: nobody is listening any more
                loop.call_soon_threadsafe(_deliver, batch)
