"""Poem requests → samplers on the shared engine: prompt, acrostic or theme, n poems, seeds.

The request arrives validated (``serving.request_models.PoemRequest``); what is left to refuse here
depends on the model: characters it never saw (``plan_poem``), rhyme or tones asked of a model
exported without its 平水韵 tables, and fixed characters (prompt, acrostic) that no rhyme group or
tone pattern can take (``plan_with_prosody``): refused before the first step, with the reason, rather
than stuck mid-stream.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

from preprocessing import Vocabulary
from serving.model_store import ExportedModel
from serving.poem_engine import PoemEngine, StepObserver
from serving.poem_sampling import PoemRequestError, PoemSampler, plan_poem
from serving.prosody import SoundTable, plan_with_prosody, poem_report
from serving.request_models import PoemRequest


def theme_keywords(theme: str, vocab: Vocabulary, limit: int) -> list[str]:
    """Keywords of a free Chinese text (jieba TF-IDF) that the model can write, best first."""
    import jieba.analyse

    words = jieba.analyse.extract_tags(theme, topK=limit * 3)
    usable = [w for w in words if all(ch in vocab for ch in w)]
    return usable[:limit]


def initialise_jieba() -> None:
    """Build jieba's dictionary at start-up, quietly, not on the first request."""
    import jieba
    import jieba.analyse  # noqa: F401 - loads the IDF table

    jieba.setLogLevel(logging.WARNING)
    jieba.initialize()


class PoemGenerator:
    def __init__(self, model: ExportedModel, max_batch: int = 64,
                 step_observer: Callable[[str], StepObserver] | None = None) -> None:
        """``step_observer(provider)``: what to call after every decoding step, made once the decoding
        process has said which provider runs the graph (the metrics are labelled with it)."""
        self.model = model
        self.vocab = Vocabulary.from_dict(model.meta["preprocessing"]["vocab"])
        config = model.meta["config"]
        if config["cell"] == "lstm":
            raise PoemRequestError("LSTM poem models are not served yet; export a GRU or RNN model")
        # the 平水韵 groups of this vocabulary (None for a model exported before they were stored)
        self.sounds = SoundTable.from_meta(model.meta, self.vocab.tokens)
        self.engine = PoemEngine(model.graph, self.vocab, config["num_layers"], config["hidden_size"], max_batch,
                                 prosody=model.meta.get("prosody") if self.sounds is not None else None)
        # the decoding process loads and warms up its model before the first request
        model.provider = self.engine.start()
        if step_observer is not None:
            self.engine.observe_step = step_observer(model.provider)
        initialise_jieba()

    def samplers(self, request: PoemRequest) -> list[PoemSampler]:
        """One sampler per poem; poem i uses seed + i so a request with a seed repeats exactly."""
        form, params = request.form, request.sampling
        line_starts: dict[int, str] = {}
        if request.theme and not request.prompt and not request.acrostic:
            keywords = theme_keywords(request.theme, self.vocab, limit=form.lines // 2)
            line_starts = {2 * i: word for i, word in enumerate(keywords)}  # the first line of each couplet
        spec = request.prosody
        seed = request.seed if request.seed is not None else secrets.randbits(31)
        if not spec.active:
            plan = plan_poem(form, self.vocab, request.prompt, request.acrostic, line_starts)
            return [PoemSampler(plan, self.vocab, params, seed + i) for i in range(request.n)]
        if self.sounds is None:
            raise PoemRequestError(
                f"the poem model {self.model.name} was exported without its 平水韵 tables, so it cannot keep rhyme "
                "or tones: ask with rhyme off and tones off, or re-export the model (python -m training export)")
        plan, constraint = plan_with_prosody(self.sounds, form, self.vocab, spec, request.prompt, request.acrostic,
                                             line_starts)
        return [PoemSampler(plan, self.vocab, params, seed + i, constraint=constraint(), constraint_spec=(form, spec))
                for i in range(request.n)]

    def report(self, sampler: PoemSampler) -> dict[str, Any]:
        """One written poem as the answer gives it: its text and seed, and with a model that has sound
        tables its rhyme group and each line's tone marks (``poem_report``; whether or not they were asked for)."""
        answer: dict[str, Any] = {"poem": sampler.text, "seed": sampler.seed}
        if self.sounds is not None:
            answer["prosody"] = poem_report(self.sounds, sampler.text)
        return answer

    def stream(self, sampler: PoemSampler, deadline: float | None = None, every_s: float = 0.0
               ) -> AsyncIterator[list[str]]:
        """The poem's characters in lists as they are written, at most one list every ``every_s``."""
        return self.engine.chunks(sampler, deadline, every_s)

    async def generate(self, sampler: PoemSampler, deadline: float | None = None) -> dict[str, Any]:
        await self.engine.generate(sampler, deadline)
        return self.report(sampler)
