"""Training a small model on a cut vocabulary: the ids its data uses keep their rows, all others share one.

A model trained from scratch on a narrow world (the demo model) uses a few thousand of the
151,936 ids; the other rows of the embedding and the LM head only ever learn "not me". Here
those rows are one shared row, exactly as in a compact checkpoint (`compact_vocabulary`), so the
loss's softmax over the whole vocabulary is, without approximation,

    logsumexp(kept logits) (+) (shared logit + log(number of other ids))

and the LM head costs [tokens, kept + 1] instead of [tokens, 151936]: most of a training step of a
small model. `tie_others` writes the shared row into every other id's row, so the saved model is
a plain full-vocabulary model whose softmax is the one that was trained.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


class CutVocabulary:
    """Kept ids, and one shared row (that of the smallest other id) standing for all other ids."""

    def __init__(self, kept_ids: Iterable[int], vocab_size: int):
        kept = sorted(set(kept_ids))
        if not kept or kept[0] < 0 or kept[-1] >= vocab_size:
            raise ValueError(f"kept ids must lie in [0, {vocab_size}); got {len(kept)} ids")
        if len(kept) >= vocab_size:
            raise ValueError("the cut vocabulary keeps every id: train without it")
        kept_set = set(kept)
        self.shared_id = next(i for i in range(vocab_size) if i not in kept_set)
        self.rows = torch.tensor([*kept, self.shared_id])  # the rows the head reads, shared last
        self.index = torch.full((vocab_size,), len(kept), dtype=torch.long)  # id -> column
        self.index[torch.tensor(kept)] = torch.arange(len(kept))
        self.others = torch.ones(vocab_size, dtype=torch.bool)
        self.others[self.rows] = False  # every other id but the shared one
        # added to the shared column: it stands for all other ids, whose logits it shares
        self.bias = torch.zeros(len(self.rows))
        self.bias[-1] = math.log(vocab_size - len(kept))

    @property
    def size(self) -> int:
        """Kept ids plus the shared row."""
        return len(self.rows)

    def to(self, device: torch.device | str) -> CutVocabulary:
        tensors = (self.rows, self.index, self.others, self.bias)
        self.rows, self.index, self.others, self.bias = (t.to(device) for t in tensors)
        return self

    def input_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """`ids` with every other id replaced by the shared one (they have the same row)."""
        return self.rows[self.index[ids]]

    def logits(self, head_weight: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """[N, kept + 1]: the kept ids' logits, then all other ids together (log-summed)."""
        return hidden @ head_weight[self.rows].T + self.bias

    def targets(self, ids: torch.Tensor) -> torch.Tensor:
        """Columns of target ids, which must all be kept ids."""
        columns = self.index[ids]
        outside = columns == self.size - 1
        if bool(outside.any()):
            raise ValueError(f"target id {int(ids[outside][0])} is not in the cut vocabulary")
        return columns

    @torch.no_grad()
    def tie_others(self, model: nn.Module) -> None:
        """Copy the shared row into every other id's row of the embedding and the LM head."""
        for weight in {id(w): w for w in vocabulary_weights(model)}.values():
            weight[self.others] = weight[self.shared_id].clone()


def vocabulary_weights(model: nn.Module) -> list[torch.Tensor]:
    """The embedding and LM head weights (the same tensor when they are tied)."""
    return [model.transformer.wte.weight, model.lm_head.weight]


def data_ids(examples: Iterable, special_ids: Iterable[int]) -> set[int]:
    """Every id the examples' inputs use, and the special tokens (chat and grounding markup)."""
    ids = set(special_ids)
    for example in examples:
        ids.update(example.input_ids)
    return ids
