"""Every poem model on every poem corpus's held-out 5%, next to that corpus's bigram baseline.

The book preset (trained on 唐诗三百首) and our default (trained on 全唐诗) are scored on the same
held-out poems of each corpus. Characters a model never saw count as its ``<unk>``, so the unknown
rate is reported beside each figure; and 全唐诗 contains most of 唐诗三百首, so the default model's
score on the 唐诗三百首 split is reported with how many of those poems it trained on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from preprocessing import Vocabulary
from training.bigram import BigramModel
from training.datasets.poems import heldout_split, load_corpus
from training.export import load_run
from training.metrics import perplexity
from training.tasks.poem import sequence_nll

CORPORA = ("tang300", "quantangshi")


def _split(name: str) -> tuple[list[str], list[str]]:
    poems = load_corpus(name)
    train_idx, test_idx = heldout_split(len(poems))
    return [poems[i] for i in train_idx], [poems[i] for i in test_idx]


def _plain(poem: str) -> str:
    return poem.replace("，", "").replace("。", "")


def cross_perplexity(run_dirs: list[Path]) -> list[dict[str, Any]]:
    splits = {name: _split(name) for name in CORPORA}
    rows = []
    for name, (train, test) in splits.items():
        vocab = Vocabulary.build(train)
        seqs = [vocab.encode(p, bos=True, eos=True) for p in test]
        bigram = BigramModel(len(vocab)).fit([vocab.encode(p, bos=True, eos=True) for p in train])
        rows.append({"model": "bigram (fitted on this corpus's training poems)", "corpus": name,
                     "perplexity": perplexity(*bigram.nll(seqs)), "unk_rate": _unk_rate(seqs, vocab),
                     "seen_in_training": 0})
    for run in run_dirs:
        model, saved = load_run(run)
        vocab = Vocabulary.from_dict(saved["preprocessing"]["vocab"])
        trained_on = saved["summary"]["dataset"]
        trained_poems = {_plain(p) for p in splits[trained_on][0]}
        for name, (_, test) in splits.items():
            seqs = [vocab.encode(p, bos=True, eos=True) for p in test]
            with torch.no_grad():
                nll, count = sequence_nll(model, seqs, torch.device("cpu"))
            rows.append({"model": f"{saved['summary']['architecture']} {saved['summary']['preset']} "
                                  f"(trained on {trained_on})", "corpus": name,
                         "perplexity": perplexity(nll, count), "unk_rate": _unk_rate(seqs, vocab),
                         "seen_in_training": sum(_plain(p) in trained_poems for p in test)})
    return rows


def _unk_rate(seqs: list[list[int]], vocab: Vocabulary) -> float:
    tokens = [t for s in seqs for t in s[1:]]
    return sum(t == vocab.unk_id for t in tokens) / len(tokens)
