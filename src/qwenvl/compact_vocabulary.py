"""A compact storage form for small models that only ever use a few hundred of the 151,936 ids.

The embedding and the LM head are stored for the kept ids only, plus one shared row that stands
for every other id (their mean: a trained model pushed them all down alike, so their logits stay
below the kept ones'). `vocabulary.kept_ids` marks such a checkpoint; loading expands it back to
the full [vocab_size, hidden] matrices, so the model and everything after loading are unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

KEPT_IDS = "vocabulary.kept_ids"
VOCABULARY_TENSORS = ("transformer.wte.weight", "lm_head.weight")


def compact(state: dict[str, torch.Tensor], kept_ids: Iterable[int]) -> dict[str, torch.Tensor]:
    """`state` with the vocabulary matrices cut to `kept_ids` + one shared row, and the ids stored."""
    ids = torch.tensor(sorted(set(kept_ids)), dtype=torch.long)
    out = dict(state)
    for name in VOCABULARY_TENSORS:
        if name not in state:  # lm_head is absent when tied to the embedding
            continue
        full = state[name]
        others = torch.ones(full.shape[0], dtype=torch.bool)
        others[ids] = False
        shared = full[others].float().mean(0, keepdim=True).to(full.dtype)
        out[name] = torch.cat([full[ids], shared]).contiguous()
    out[KEPT_IDS] = ids
    return out


def expand(part: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """The full-size state of a compact checkpoint part (unchanged when it is not compact)."""
    if KEPT_IDS not in part:
        return part
    out = dict(part)
    ids = out.pop(KEPT_IDS).long()
    for name in VOCABULARY_TENSORS:
        if name not in out:
            continue
        rows = out[name]
        if rows.shape[0] != len(ids) + 1:
            raise ValueError(
                f"{name} has {rows.shape[0]} rows, a compact vocabulary of {len(ids)} ids has {len(ids) + 1}"
            )
        full = rows[-1:].expand(vocab_size, -1).clone()
        full[ids] = rows[:-1]
        out[name] = full
    return out
