"""Configuration in one place: a Qwen-VL checkpoint's config.json keys and the sizes derived from them."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from transformers import PretrainedConfig

MODEL_TYPE = "qwen"
RESAMPLER_HEAD_DIM = 128  # the original resampler has output_dim / 128 heads


def _is_number(value: Any) -> bool:
    """An int or a finite float (JSON true and false are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_positive_int(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be a positive integer, got {value!r}")


def _check_positive_number(key: str, value: Any) -> None:
    if not _is_number(value) or value <= 0:
        raise ValueError(f"{key} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class VisionConfig:
    """The `visual` block of config.json."""

    image_size: int = 448
    patch_size: int = 14
    width: int = 1664
    layers: int = 48
    heads: int = 16
    mlp_ratio: float = 4.9231
    output_dim: int = 4096
    image_start_id: int = 151857
    n_queries: int = 256  # resampler queries = positions of an image span

    def __post_init__(self) -> None:
        """ValueError naming a key (as `visual.key`) whose value no model can be built with."""
        for key in ("image_size", "patch_size", "width", "layers", "heads", "output_dim", "n_queries"):
            _check_positive_int(f"visual.{key}", getattr(self, key))
        _check_positive_number("visual.mlp_ratio", self.mlp_ratio)
        if self.image_size % self.patch_size:
            raise ValueError(
                f"visual.image_size {self.image_size} is not a multiple of "
                f"visual.patch_size {self.patch_size}"
            )
        if self.width % self.heads:
            raise ValueError(f"visual.width {self.width} is not a multiple of visual.heads {self.heads}")
        if self.output_dim % RESAMPLER_HEAD_DIM:
            raise ValueError(
                f"visual.output_dim {self.output_dim} is not a multiple of {RESAMPLER_HEAD_DIM}, "
                f"the width of the resampler's heads"
            )
        # the position tables (ViT and resampler) are square grids, resized from n_queries cells
        if math.isqrt(self.n_queries) ** 2 != self.n_queries:
            raise ValueError(f"visual.n_queries {self.n_queries} is not a square number")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VisionConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def resampler_heads(self) -> int:
        return self.output_dim // RESAMPLER_HEAD_DIM


@dataclass(frozen=True)
class LLMConfig:
    """The language-model keys of config.json."""

    vocab_size: int = 151936
    hidden_size: int = 4096
    num_attention_heads: int = 32
    kv_channels: int = 128
    num_hidden_layers: int = 32
    intermediate_size: int = 22016
    layer_norm_epsilon: float = 1e-6
    rotary_emb_base: float = 10000.0
    rotary_pct: float = 1.0
    seq_length: int = 2048
    max_position_embeddings: int = 8192
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    no_bias: bool = True

    def __post_init__(self) -> None:
        """ValueError naming a key whose value no model can be built with."""
        sizes = (
            "vocab_size",
            "hidden_size",
            "num_attention_heads",
            "kv_channels",
            "num_hidden_layers",
            "intermediate_size",
            "seq_length",
            "max_position_embeddings",
        )
        for key in sizes:
            _check_positive_int(key, getattr(self, key))
        for key in ("layer_norm_epsilon", "rotary_emb_base"):
            _check_positive_number(key, getattr(self, key))
        if not _is_number(self.rotary_pct) or not 0 < self.rotary_pct <= 1:
            raise ValueError(f"rotary_pct must lie in (0, 1], got {self.rotary_pct!r}")
        # rotation turns channel pairs, and the NTK base's exponent divides by rotary_dim - 2
        if self.rotary_dim % 2 or self.rotary_dim < 4:
            raise ValueError(
                f"kv_channels {self.kv_channels} * rotary_pct {self.rotary_pct} gives "
                f"{self.rotary_dim} rotary channels: an even number of at least 4 is needed"
            )
        if self.use_logn_attn and self.seq_length < 2:
            raise ValueError(
                f"seq_length {self.seq_length} with use_logn_attn: the log-n scale divides by log(seq_length)"
            )

    @property
    def projection_size(self) -> int:
        return self.kv_channels * self.num_attention_heads

    @property
    def mlp_width(self) -> int:
        # the checkpoint's intermediate_size counts both SwiGLU branches
        return self.intermediate_size // 2

    @property
    def rotary_dim(self) -> int:
        return int(self.kv_channels * self.rotary_pct)


class QwenVLConfig(PretrainedConfig):
    """config.json of Qwen-VL / Qwen-VL-Chat (model_type "qwen"); the original's auto_map is ignored."""

    model_type = MODEL_TYPE
    keys_to_ignore_at_inference = ["past_key_values"]
    # Token ids that transformers' generate and pipelines read from a model's config, which
    # transformers 5 no longer defines. The original's config.json has none (they are in
    # generation_config.json): class defaults, so a config.json saved stays as the original's;
    # one given in config.json is kept.
    pad_token_id = bos_token_id = eos_token_id = None

    def __init__(
        self,
        vocab_size: int = 151936,
        hidden_size: int = 4096,
        num_attention_heads: int = 32,
        kv_channels: int = 128,
        num_hidden_layers: int = 32,
        intermediate_size: int = 22016,
        layer_norm_epsilon: float = 1e-6,
        rotary_emb_base: float = 10000.0,
        rotary_pct: float = 1.0,
        seq_length: int = 2048,
        max_position_embeddings: int = 8192,
        use_dynamic_ntk: bool = True,
        use_logn_attn: bool = True,
        no_bias: bool = True,
        visual: dict[str, Any] | None = None,
        bf16: bool = False,
        fp16: bool = False,
        fp32: bool = False,
        tie_word_embeddings: bool = False,
        **kwargs: Any,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.kv_channels = kv_channels
        self.num_hidden_layers = num_hidden_layers
        self.intermediate_size = intermediate_size
        self.layer_norm_epsilon = layer_norm_epsilon
        self.rotary_emb_base = rotary_emb_base
        self.rotary_pct = rotary_pct
        self.seq_length = seq_length
        self.max_position_embeddings = max_position_embeddings
        self.use_dynamic_ntk = use_dynamic_ntk
        self.use_logn_attn = use_logn_attn
        self.no_bias = no_bias
        self.visual = dict(visual or {})
        self.bf16, self.fp16, self.fp32 = bf16, fp16, fp32
        # remote-code and training-only keys (use_flash_attn, onnx_safe, dropout...) are accepted and unused
        kwargs.pop("auto_map", None)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def check(self) -> None:
        """ValueError naming a key (and its value) that no model can be built with."""
        _ = self.llm, self.vision  # each dataclass checks its values as it is built

    @property
    def llm(self) -> LLMConfig:
        known = {f.name for f in fields(LLMConfig)}
        return LLMConfig(**{k: getattr(self, k) for k in known})

    @property
    def vision(self) -> VisionConfig:
        return VisionConfig.from_dict(self.visual)
