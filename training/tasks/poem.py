"""Character language modelling of Tang poems, scored by held-out perplexity against a bigram.

Every poem is ``<bos> characters-and-，。 <eos>``. The default recipe trains on whole poems; the
textbook's recipe trains on 24-character windows (stride 1), with poems shorter than a window kept
as one padded window (the book dropped them). Perplexity counts every predicted token after
``<bos>``, ``<eos>`` included, on a fixed held-out 5% of poems; the bigram baseline is fitted on the
same training poems and scored on the same tokens.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from preprocessing import Vocabulary
from training.bigram import BigramModel
from training.datasets.poems import heldout_split
from training.metrics import perplexity

PAD = 0
EVAL_TOKENS = 16_384  # padded positions per evaluation batch: bounds its [batch, length, vocabulary] logits


def _pad(seqs: list[list[int]], device: torch.device) -> torch.Tensor:
    out = torch.full((len(seqs), max(len(s) for s in seqs)), PAD, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s)
    return out.to(device)


@torch.no_grad()
def sequence_nll(model: nn.Module, seqs: list[list[int]], device: torch.device) -> tuple[float, int]:
    """Total NLL and token count over whole sequences, the state carried from ``<bos>``."""
    total, count = 0.0, 0
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    start = 0
    while start < len(order):
        # Up to 256 sequences, and at most EVAL_TOKENS padded positions: sorted by length, the last one
        # taken is the longest, and one 854-character 排律 must not pad 255 others (gigabytes of logits).
        end = start + 1
        while end < len(order) and end - start < 256 and (end + 1 - start) * len(seqs[order[end]]) <= EVAL_TOKENS:
            end += 1
        batch = _pad([seqs[i] for i in order[start:end]], device)
        start = end
        logits, _ = model(batch[:, :-1])
        targets = batch[:, 1:]
        total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                 ignore_index=PAD, reduction="sum").item()
        count += int((targets != PAD).sum().item())
    return total, count


class PoemTask:
    monitor = "val_perplexity"
    mode = "min"

    def __init__(self, poems: list[str], batch_size: int, device: torch.device, window: int | None,
                 min_count: int = 1, limit: int | None = None) -> None:
        self.device, self.batch_size, self.window = device, batch_size, window
        train_idx, test_idx = heldout_split(len(poems))
        rng = np.random.RandomState(1)
        val_mask = rng.rand(len(train_idx)) < 0.05
        fit_idx, val_idx = train_idx[~val_mask], train_idx[val_mask]
        if limit:
            fit_idx, val_idx = fit_idx[:limit], val_idx[: max(limit // 20, 50)]
        self.train_poems = [poems[i] for i in fit_idx]
        self.test_poems = [poems[i] for i in test_idx]
        self.vocab = Vocabulary.build(self.train_poems, min_count=min_count)
        self.train_seqs = [self.vocab.encode(p, bos=True, eos=True) for p in self.train_poems]
        self.val_seqs = [self.vocab.encode(poems[i], bos=True, eos=True) for i in val_idx]
        if window:
            span = window + 1
            self.samples = [s[i: i + span] for s in self.train_seqs for i in range(max(1, len(s) - span + 1))]
        else:
            self.samples = self.train_seqs

    def num_batches(self) -> int:
        return -(-len(self.samples) // self.batch_size)

    def batches(self, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        perm = torch.randperm(len(self.samples), generator=generator).tolist()
        # Sort within chunks of 32 batches so a batch holds poems of similar length (less padding).
        chunk = self.batch_size * 32
        batches = []
        for start in range(0, len(perm), chunk):
            part = sorted(perm[start: start + chunk], key=lambda i: len(self.samples[i]))
            batches += [part[i: i + self.batch_size] for i in range(0, len(part), self.batch_size)]
        order = torch.randperm(len(batches), generator=generator).tolist()
        for b in order:
            seqs = _pad([self.samples[i] for i in batches[b]], self.device)
            yield seqs[:, :-1], seqs[:, 1:]

    def loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, float]]:
        logits, _ = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=PAD)
        n = int((targets != PAD).sum().item())
        return loss, {"nll_sum": loss.item() * n, "count": n}

    def summarise(self, totals: dict[str, float]) -> dict[str, float]:
        return {"train_perplexity": perplexity(totals.get("nll_sum", 0.0), int(totals.get("count", 0)))}

    def nll(self, model: nn.Module, seqs: list[list[int]]) -> tuple[float, int]:
        return sequence_nll(model, seqs, self.device)

    def validate(self, model: nn.Module) -> dict[str, float]:
        return {"val_perplexity": perplexity(*self.nll(model, self.val_seqs))}

    def evaluate(self, model: nn.Module) -> dict:
        test_seqs = [self.vocab.encode(p, bos=True, eos=True) for p in self.test_poems]
        bigram = BigramModel(len(self.vocab)).fit(self.train_seqs)
        model_ppl = perplexity(*self.nll(model, test_seqs))
        bigram_ppl = perplexity(*bigram.nll(test_seqs))
        unk = sum(t == self.vocab.unk_id for s in test_seqs for t in s)
        return {"perplexity": model_ppl, "bigram_perplexity": bigram_ppl,
                "ratio_to_bigram": model_ppl / bigram_ppl, "heldout_poems": len(test_seqs),
                "heldout_tokens": sum(len(s) - 1 for s in test_seqs), "heldout_unk_tokens": unk,
                "vocab_size": len(self.vocab), "train_poems": len(self.train_poems)}
