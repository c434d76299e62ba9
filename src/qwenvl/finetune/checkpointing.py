"""Switching the model's activation checkpointing on and off, through wrappers such as peft's."""

from __future__ import annotations

from torch import nn


def set_gradient_checkpointing(model: nn.Module, enabled: bool) -> int:
    """Set the flag of every block stack (LLM and ViT) inside `model`; returns how many were set."""
    stacks = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    for stack in stacks:
        stack.gradient_checkpointing = enabled
    return len(stacks)
