"""Fine-tuning Qwen-VL on conversations with images (the `finetune` extra: peft for LoRA).

    from qwenvl.finetune import TrainingConfig, finetune
    finetune(model, tokenizer, "train.json", TrainingConfig(lora=True, epochs=3), "out/")

Command line: `qwenvl finetune --model M --data train.json --output DIR [--lora ...]`, or
`python -m qwenvl.finetune ...` with the same options.
"""

from .cli import add_arguments, main, run_from_args
from .data import Batch, ConversationDataset, DataError, Example, collate, encode_conversation, load_items
from .train import finetune, supervised_loss_sum
from .training_config import TrainingConfig

__all__ = [
    "Batch",
    "ConversationDataset",
    "DataError",
    "Example",
    "TrainingConfig",
    "add_arguments",
    "collate",
    "encode_conversation",
    "finetune",
    "load_items",
    "main",
    "run_from_args",
    "supervised_loss_sum",
]
