"""LoRA adapters on the LLM's linear layers, through peft (an optional dependency: the `finetune` extra).

A saved adapter folder (adapter_config.json + adapter_model.safetensors) loads onto its base with

    from peft import PeftModel
    model = PeftModel.from_pretrained(QwenVLForCausalLM.from_pretrained(base), adapter_folder)

and `model.merge_and_unload()` gives a plain QwenVLForCausalLM with the adapter folded into its weights.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from torch import nn

# The original Qwen-VL recipe's targets: attention in/out projections and the MLP's two input branches;
# "c_proj" names both the attention output and the MLP output projection.
DEFAULT_LORA_TARGETS = ("c_attn", "c_proj", "w1", "w2")
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _peft():
    try:
        import peft
    except ImportError as e:
        raise ImportError("LoRA needs peft: pip install 'qwenvl[finetune]' (or pip install peft)") from e
    return peft


def lora_target_pattern(names: Sequence[str]) -> str:
    """A regex peft matches (re.fullmatch) against module names: the named layers of the LLM's blocks.

    Plain names would also match the vision tower's `mlp.c_proj` layers; the prefix keeps them out.
    """
    if not names:
        raise ValueError("LoRA needs at least one target module name")
    alternatives = "|".join(re.escape(name) for name in names)
    return rf"transformer\.h\.\d+\.(?:.+\.)?(?:{alternatives})"


def add_lora(
    model: nn.Module,
    r: int = 64,
    alpha: float = 16,
    dropout: float = 0.05,
    targets: Sequence[str] = DEFAULT_LORA_TARGETS,
) -> nn.Module:
    """The model wrapped in a peft PeftModel; only the adapter's parameters require gradients."""
    peft = _peft()
    config = peft.LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=lora_target_pattern(targets), bias="none"
    )
    wrapped = peft.get_peft_model(model, config)
    if not any(p.requires_grad for p in wrapped.parameters()):
        raise ValueError(f"no LLM layer is named like one of the LoRA targets {list(targets)}")
    return wrapped


def load_adapter_weights(wrapped: nn.Module, folder: str | os.PathLike) -> None:
    """Put the adapter weights saved in `folder` into a model built by `add_lora` with the same settings."""
    from safetensors.torch import load_file

    result = _peft().set_peft_model_state_dict(wrapped, load_file(os.path.join(folder, ADAPTER_WEIGHTS)))
    if result.unexpected_keys:
        raise ValueError(
            f"the adapter in {folder} has weights this model lacks: {result.unexpected_keys[:3]}"
        )
