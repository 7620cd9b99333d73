"""The seed's classifier head, trained on top of a frozen embedder."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ClassifierHead(nn.Module):
    """(N, embedding_dim) embeddings -> (N, num_classes) log-probabilities (for NLLLoss).

    Dropout -> Linear(D, hidden) -> ReLU -> Dropout -> Linear(hidden, C) -> log_softmax,
    as in the seed (D = 128, hidden = 64, dropout 0.5).
    """

    def __init__(
        self,
        embedding_dim: int = 128,
        hidden: int = 64,
        num_classes: int = 10,
        dropout: float = 0.5,
    ):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.embedding_dim = embedding_dim
        self.num_classes = num_classes
        self.layers = nn.Sequential(
            nn.Dropout(dropout),  # on the embedding itself
            nn.Linear(embedding_dim, hidden),  # (N,hidden)
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),  # (N,C) logits
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.layers(x), dim=1)  # (N,C), rows logsumexp to 0
