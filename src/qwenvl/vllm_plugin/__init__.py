"""qwenvl as a vLLM plugin: `vllm serve Qwen/Qwen-VL-Chat` with no remote code.

vLLM calls `register` (the `vllm.general_plugins` entry point) in each of its processes before it
reads a model. It registers, for the `QWenLMHeadModel` architecture of official folders:

- the config (`config.VllmQwenVLConfig`, AutoConfig's class for model_type "qwen"), with the
  engine settings the model needs (`config.EngineSettings`);
- the tokenizer under the class name the folders' tokenizer_config.json gives (`QWenTokenizer`),
  with Qwen-VL-Chat's ChatML prompt (`tokenizer.py`, `chat.py`);
- the model (`model.py`) and its multimodal processor (`processor.py`).

Only vLLM's processes import this package; the rest of qwenvl never imports vLLM.
"""

from __future__ import annotations

ARCHITECTURE = "QWenLMHeadModel"


def register() -> None:
    """Idempotent: vLLM may call it more than once in a process."""
    from transformers import AutoConfig, AutoTokenizer
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from ..config import MODEL_TYPE
    from ..tokenizer import QWenTokenizer
    from .config import EngineSettings, VllmQwenVLConfig
    from .model import QWenLMHeadModel
    from .tokenizer import QwenVLTokenizerForVllm

    AutoConfig.register(MODEL_TYPE, VllmQwenVLConfig, exist_ok=True)
    # the folders name "QWenTokenizer": registered as its fast alias, this class is what AutoTokenizer builds
    AutoTokenizer.register(
        VllmQwenVLConfig,
        slow_tokenizer_class=QWenTokenizer,
        fast_tokenizer_class=QwenVLTokenizerForVllm,
        exist_ok=True,
    )
    # vLLM's table of per-architecture config hooks: the way a model adjusts engine settings
    MODELS_CONFIG_MAP[ARCHITECTURE] = EngineSettings
    # the class itself (importing it starts no device): vLLM then inspects it in this process
    # rather than in a subprocess of its own
    ModelRegistry.register_model(ARCHITECTURE, QWenLMHeadModel)
