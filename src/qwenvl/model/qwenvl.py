"""The whole network: token embeddings with image features written in, the LLM stack, the final norm.

`QWenModel` is the checkpoint's `transformer` (wte, h, ln_f, visual); `qwenvl.modeling`'s
`QwenVLForCausalLM` adds `lm_head` and the transformers/original-compatible surface.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..cache import KVCache
from ..config import QwenVLConfig
from ..transfers import to_device
from .llm import QWenBlock, RMSNorm, Step, attention_kernels
from .ops import TORCH_OPS, TorchOps
from .vision import VisionTransformer


class ImageSpanError(ValueError):
    """Image features and the image spans of the token ids do not fit together."""


def image_span_starts(input_ids: torch.Tensor, img_start_id: int) -> list[tuple[int, int]]:
    """(row, position) of every `<img>` id, in order of appearance (row by row)."""
    return [tuple(p) for p in (input_ids == img_start_id).nonzero().tolist()]


class QWenModel(nn.Module):
    """Embeddings -> blocks -> final norm; image features replace the 256 ids inside each image span."""

    def __init__(self, config: QwenVLConfig, vision_tower: type[VisionTransformer] = VisionTransformer):
        """`vision_tower`: the class of `visual` (the root adds the original's image-reading API)."""
        super().__init__()
        llm, vision = config.llm, config.vision
        self.llm_config, self.vision_config = llm, vision
        self.wte = nn.Embedding(llm.vocab_size, llm.hidden_size)
        self.h = nn.ModuleList(QWenBlock(llm) for _ in range(llm.num_hidden_layers))
        self.ln_f = RMSNorm(llm.hidden_size, llm.layer_norm_epsilon)
        self.visual = vision_tower(vision)
        # training only: recompute each block's activations in the backward pass (transformers'
        # gradient_checkpointing_enable() finds and sets this flag)
        self.gradient_checkpointing = False

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings [B, L, H] with `image_features` [N, 256, H] written into the N image spans.

        `input_ids` on the host (as `prefill` gives them) spare a wait for the GPU: the spans are
        found there, and the ids reach the embedding's device as a queued copy.
        """
        device = self.wte.weight.device
        host_ids = input_ids.cpu() if image_features is not None else None  # ids on a GPU: a wait
        on_host = input_ids.device.type == "cpu"
        embeds = self.wte(to_device(input_ids, device) if on_host else input_ids.to(device))
        if image_features is None:
            return embeds
        span = self.vision_config.n_queries
        starts = image_span_starts(host_ids, self.vision_config.image_start_id)
        if len(starts) != len(image_features):
            raise ImageSpanError(
                f"{len(image_features)} image features for {len(starts)} image spans in the ids"
            )
        end_id = self.vision_config.image_start_id + 1
        embeds = embeds.clone()  # written below; the embedding output may be a leaf that needs grad
        for (row, pos), features in zip(starts, image_features, strict=True):
            end = pos + span + 1
            if end >= input_ids.shape[1] or int(host_ids[row, end]) != end_id:
                raise ImageSpanError(f"the image span at row {row}, position {pos} is not {span} ids long")
            embeds[row, pos + 1 : end] = features.to(embeds.device, embeds.dtype)
        return embeds

    def forward(
        self,
        embeds: torch.Tensor,
        cache: KVCache | None = None,
        lengths: list[int] | None = None,
        ops: TorchOps = TORCH_OPS,
    ) -> torch.Tensor:
        """Hidden states [B, L, H] of `embeds`; rows hold `lengths` real tokens (right padding).
        `cache`: the keys and values so far, written and advanced; `ops`: who does the layers' work."""
        batch, length, _ = embeds.shape
        lengths = lengths if lengths is not None else [length] * batch
        step = Step.build(self.llm_config, batch, length, cache, lengths, embeds.device, embeds.dtype)
        hidden = self.run(embeds, step, ops)
        if cache is not None:
            cache.lengths += to_device(torch.tensor(lengths), cache.lengths.device)
            cache.advanced(lengths)
        return hidden

    def run(self, embeds: torch.Tensor, step: Step, ops: TorchOps = TORCH_OPS) -> torch.Tensor:
        """The blocks and the final norm over a prepared step (the cache's lengths are the caller's).
        In a model spread over devices the residual stream and the step follow each block to its
        device; the hidden states come out on the final norm's."""
        x, pending = embeds, None
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        with attention_kernels():
            for layer, block in enumerate(self.h):
                device = block.ln_1.weight.device
                x, pending = _moved(x, pending, device)
                step = step if step.device == device else step.to(device)
                if recompute and step.cache is None:
                    x, pending = checkpoint(block, x, pending, step, layer, ops, use_reentrant=False)
                else:
                    x, pending = block(x, pending, step, layer, ops)
            x, pending = _moved(x, pending, self.ln_f.weight.device)
            return ops.add_norm(x, pending, self.ln_f)[1]


def _moved(
    x: torch.Tensor, pending: torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The residual stream and the branch output still to add, on `device`."""
    if x.device == device:
        return x, pending
    return x.to(device), None if pending is None else pending.to(device)
