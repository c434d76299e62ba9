"""Configuration in one place: a Qwen-VL checkpoint's config.json keys and the sizes derived from them."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from transformers import PretrainedConfig

MODEL_TYPE = "qwen"


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
        return self.output_dim // 128


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

    @property
    def llm(self) -> LLMConfig:
        known = {f.name for f in fields(LLMConfig)}
        return LLMConfig(**{k: getattr(self, k) for k in known})

    @property
    def vision(self) -> VisionConfig:
        return VisionConfig.from_dict(self.visual)
