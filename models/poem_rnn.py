"""PoemRNN: a character language model for Tang poems, Embedding → RNN → Linear.

``batch_first=True`` throughout: the textbook (尚硅谷 9.4) feeds ``[batch, seq]`` to an RNN that
expects ``[seq, batch]``, silently mixing poems; we do not copy that. ``step`` is the single-token
form that export turns into the serving graph ``(token[B], state) → (logits[B, V], state)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

_CELLS = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}


@dataclass(frozen=True)
class PoemRNNConfig:
    vocab_size: int = 0  # set from the Vocabulary
    embedding_dim: int = 256
    hidden_size: int = 512
    num_layers: int = 2
    cell: str = "gru"
    dropout: float = 0.2


State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class PoemRNN(nn.Module):
    def __init__(self, config: PoemRNNConfig) -> None:
        super().__init__()
        if config.vocab_size <= 0:
            raise ValueError("PoemRNNConfig.vocab_size must be the vocabulary size")
        if config.cell not in _CELLS:
            raise ValueError(f"unknown cell {config.cell!r}: use one of {sorted(_CELLS)}")
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_dim, padding_idx=0)
        self.rnn = _CELLS[config.cell](
            config.embedding_dim,
            config.hidden_size,
            num_layers=config.num_layers,
            batch_first=True,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
        )
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, tokens: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """``tokens [B, T]`` → ``logits [B, T, V]`` and the final state."""
        output, state = self.rnn(self.embedding(tokens), state)
        return self.head(self.drop(output)), state

    def step(self, token: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One token per sequence: ``token [B]`` → ``logits [B, V]``."""
        logits, state = self.forward(token.unsqueeze(1), state)
        return logits.squeeze(1), state

    def initial_state(self, batch_size: int, device: torch.device | str = "cpu") -> State:
        shape = (self.config.num_layers, batch_size, self.config.hidden_size)
        h = torch.zeros(shape, device=device)
        return (h, torch.zeros_like(h)) if self.config.cell == "lstm" else h
