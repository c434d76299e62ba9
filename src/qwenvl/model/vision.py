"""The vision tower (`transformer.visual`): a ViT over 14-px patches, then the resampler (SPEC 4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import VisionConfig
from .llm import attention_kernels
from .resampler import Resampler, resize_positions, sincos_positions

INIT_STD = 0.02  # fresh models only
# fresh towers (see VisionTransformer._start_as_colour_encoder): the scale of a patch's mean
# colour channels, and how much of the random patch embedding the other channels keep
COLOUR_GAIN = 2.0
COLOUR_ENCODER_NOISE = 0.25


class VisualAttention(nn.Module):
    """Self-attention whose `in_proj` rows are grouped per head: [q_h; k_h; v_h] for each head h."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.in_proj.weight)  # fresh models: non-uniform attention from the start
        nn.init.zeros_(self.in_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = self.in_proj(x).view(batch, length, self.heads, 3, width // self.heads)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each [B, heads, L, d]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class VisualMLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = nn.GELU()  # erf form, as the original
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class VisualBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.attn = VisualAttention(cfg.width, cfg.heads)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.mlp = VisualMLP(cfg.width, cfg.mlp_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class VisualTransformer(nn.Module):
    """`transformer.visual.transformer`: the stack of ViT blocks."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(VisualBlock(cfg) for _ in range(cfg.layers))
        self.gradient_checkpointing = False  # training only, as in QWenModel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.resblocks:
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
        return x


class VisionTransformer(nn.Module):
    """Pixels [N, 3, S, S] -> image features [N, 256, output_dim]."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        # the checkpoint's patch embedding; applied by `embed_patches`
        self.conv1 = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.n_queries, cfg.width))
        self.ln_pre = nn.LayerNorm(cfg.width, eps=1e-6)
        self.transformer = VisualTransformer(cfg)
        self.attn_pool = Resampler(cfg.n_queries, cfg.output_dim, cfg.resampler_heads, kv_dim=cfg.width)
        self.ln_post = nn.LayerNorm(cfg.output_dim, eps=1e-6)
        self.proj = nn.Parameter(torch.empty(cfg.output_dim, cfg.output_dim))

    def reset_parameters(self) -> None:
        # a 2-D sine-cosine table as large as the patch embeddings: the features a fresh model
        # hands to the LLM say where each patch lies (what grounding needs) from the first step
        with torch.no_grad():
            self.positional_embedding.copy_(sincos_positions(*self.positional_embedding.shape))
        nn.init.normal_(self.proj, std=self.config.output_dim**-0.5)
        self._start_as_colour_encoder()

    @torch.no_grad()
    def _start_as_colour_encoder(self) -> None:
        """Fresh towers: each patch feature starts as its colour against the picture's, and its position.

        Random blocks hand the LLM features in which nothing stands out where a shape lies, and a
        small model trained from scratch then never learns to point (grounding stayed at chance
        over 6000 steps). Here channels 0-2 of a patch embedding are its mean R, G, B; the first
        block subtracts the picture's mean colour from them (uniform attention); every other
        residual branch starts at zero, so the blocks pass the features on.
        """
        conv = self.conv1.weight  # [width, 3, patch, patch], freshly drawn
        patch_area = conv.shape[-1] * conv.shape[-2]
        conv.mul_(COLOUR_ENCODER_NOISE)
        conv[:3].zero_()
        for channel in range(3):
            conv[channel, channel] = COLOUR_GAIN / patch_area
        blocks = self.transformer.resblocks
        for block in blocks:
            for branch in (block.attn.out_proj, block.mlp.c_proj):
                nn.init.zeros_(branch.weight)
                nn.init.zeros_(branch.bias)
        if not blocks:
            return
        first = blocks[0].attn
        head_dim = first.in_proj.weight.shape[1] // first.heads
        nn.init.zeros_(first.in_proj.weight)  # q = k = 0: every patch attends to all equally
        nn.init.zeros_(first.in_proj.bias)
        for channel in range(3):  # head 0's values are the colour channels; out_proj subtracts them
            first.in_proj.weight[2 * head_dim + channel, channel] = 1.0
            first.out_proj.weight[channel, channel] = -1.0

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_features(pixels)
        with attention_kernels():
            x = self.attn_pool(x)
        return self.ln_post(x) @ self.proj

    def patch_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [N, 3, S, S] -> the ViT's output per patch [N, patches, width], before the resampler."""
        x = self.embed_patches(pixels.to(self.conv1.weight.dtype))  # [N, patches, width]
        x = x + resize_positions(self.positional_embedding, x.shape[1])
        with attention_kernels():
            return self.transformer(self.ln_pre(x))

    def embed_patches(self, pixels: torch.Tensor) -> torch.Tensor:
        """`conv1` (kernel = stride = patch) as one matrix product over the flattened patches.

        The same sums as the convolution, 5x faster on a GPU: cuDNN took 112 us for Qwen-VL's
        14x14-stride-14 convolution to 1664 channels on an H100, the product 22 us.
        """
        n, channels, height, width = pixels.shape
        p = self.config.patch_size
        rows, cols = height // p, width // p
        patches = pixels[:, :, : rows * p, : cols * p].reshape(n, channels, rows, p, cols, p)
        patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(n, rows * cols, channels * p * p)
        return F.linear(patches, self.conv1.weight.flatten(1))
