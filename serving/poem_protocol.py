"""What the server and its poem decoding process say to each other: every message, its kind, and when.

Two processes take part: the server's :class:`serving.poem_engine.PoemEngine` (in the BentoML worker,
the only peer) and the decoding loop of :mod:`serving.poem_decoder`, which the engine starts as
``python -m serving.poem_decoder`` with the repository as its working directory (so ``-m`` finds the
``serving`` package wherever the code is installed: a checkout, a wheel, a Bento). Each message is one
frozen dataclass below, pickled onto the child's stdin (server → decoder) or its stdout (decoder →
server); ``kind`` names it, and each side dispatches on that enum. Pickle because both ends are this
code and trust each other, and a typed message costs ~4.6 µs to write and read against a tuple's
~2 µs, 0.2% of a 2.3 ms batch-16 decoding step (measured here).

Server → decoder:

- :class:`Setup`, once, first: the graph, vocabulary, batch limit and the model's sound tables. The
  decoder loads and warms up its ONNX Runtime session, then answers :class:`Ready` (the provider it
  runs on) or :class:`Unusable` (why ONNX Runtime cannot run the graph) and exits with status 1.
- :class:`AddPoem`: a poem to write (its plan, sampling parameters, seed, and its rhyme and tone
  constraint if any), from a request already validated by :mod:`serving.requests`. It joins the
  batch at the next step, or waits while ``max_batch`` poems are live. The server may send it
  before :class:`Ready`: the decoder reads its input while the model loads, so the pipe never fills.
- :class:`CancelPoem`: the reader left (client gone, deadline passed); the poem leaves the batch.
- :class:`Retire`: no poem will follow; finish the ones held, then exit with status 0. Sent in
  answer to :class:`Draining`.
- End of input (the server closed the pipe, or died): exit at once. A server that stops for good
  (``PoemEngine.stop``) does this; so does the kernel when the worker is killed, so no decoder
  outlives its server.

Decoder → server:

- :class:`Ready` / :class:`Unusable`, once, as above.
- :class:`Step`, after every model step: how many poems it held, how long it took, and the token
  each poem got. The server's reader thread advances each poem's own sampler with it (so
  ``sampler.text`` holds in the server) and posts the characters to the poem's event loop.
- :class:`StepFailed`: a step raised. Those poems end with "generation failed: <error class>";
  the loop goes on with the poems that join after.
- :class:`Draining`: the decoder got SIGTERM. It keeps writing what it holds and what the server
  sent before it read this message; the server starts a new decoder for the poems that come after
  and answers :class:`Retire`. Why not exit on SIGTERM at once: BentoML's process manager (circus)
  signals every child of a worker when the server drains, which used to end each poem in flight
  with an ``error`` event while the server was still finishing its requests.

Failure: if the decoding process dies (killed, crashed), its stdout ends; the server fails the poems
it held with ``DecoderStopped`` (a 503 that says to try again), and the next poem starts a new one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, ClassVar

from serving.poem_sampling import PoemForm, SamplingParams
from serving.prosody import ProsodySpec


class Kind(enum.Enum):
    SETUP = "setup"
    ADD_POEM = "add_poem"
    CANCEL_POEM = "cancel_poem"
    RETIRE = "retire"
    READY = "ready"
    UNUSABLE = "unusable"
    STEP = "step"
    STEP_FAILED = "step_failed"
    DRAINING = "draining"


# ----- server → decoder -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    kind: ClassVar[Kind] = Kind.SETUP
    graph: str  # the exported step graph, ``(token[B], hidden[L,B,H]) → (logits[B,V], hidden)``
    tokens: tuple[str, ...]  # the vocabulary, in id order
    num_layers: int
    hidden_size: int
    max_batch: int  # live poems per step; more wait their turn
    # the model's 平水韵 tables (meta.json's ``prosody``), None for a model exported without them; the
    # decoder builds one ``serving.prosody.SoundTable`` from it for every poem (measured: 37 KB pickled and
    # 3.7 ms to build for a vocabulary of all the tables' 8,377 characters; sent and built once)
    prosody: dict[str, Any] | None = None


@dataclass(frozen=True)
class AddPoem:
    kind: ClassVar[Kind] = Kind.ADD_POEM
    poem_id: int  # the server's number for the poem, unique per engine
    plan: tuple[int | None, ...]  # the token each slot must hold, None where it is sampled
    params: SamplingParams
    seed: int
    # rhyme and tones, with the form they apply to; None: unconstrained (the request checked that the
    # model has tables and that the plan can meet the spec, so the decoder builds its state without a refusal)
    form: PoemForm | None = None
    prosody: ProsodySpec | None = None


@dataclass(frozen=True)
class CancelPoem:
    kind: ClassVar[Kind] = Kind.CANCEL_POEM
    poem_id: int


@dataclass(frozen=True)
class Retire:
    kind: ClassVar[Kind] = Kind.RETIRE


ToDecoder = Setup | AddPoem | CancelPoem | Retire


# ----- decoder → server -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    kind: ClassVar[Kind] = Kind.READY
    provider: str  # the ONNX Runtime execution provider the session runs on


@dataclass(frozen=True)
class Unusable:
    kind: ClassVar[Kind] = Kind.UNUSABLE
    reason: str  # a sentence for /readyz: which graph, and ONNX Runtime's error


@dataclass(frozen=True)
class Step:
    kind: ClassVar[Kind] = Kind.STEP
    rows: int  # poems in the step
    seconds: float  # the model call and the sampling
    poem_ids: tuple[int, ...]
    tokens: tuple[int, ...]  # the token each of ``poem_ids`` got, in the same order


@dataclass(frozen=True)
class StepFailed:
    kind: ClassVar[Kind] = Kind.STEP_FAILED
    poem_ids: tuple[int, ...]  # every poem of the step: all of them end
    error: str  # the exception's class name (the traceback is in the decoder's log)


@dataclass(frozen=True)
class Draining:
    kind: ClassVar[Kind] = Kind.DRAINING


FromDecoder = Ready | Unusable | Step | StepFailed | Draining
