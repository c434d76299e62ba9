"""`QWenLMHeadModel` for vLLM: the Qwen LLM in vLLM's parallel layers, qwenvl's vision tower beside it.

Module names are the checkpoint's (`transformer.h.{i}.attn.c_attn`, `transformer.visual...`), except
the MLP's two input projections, which run as one merged product (`gate_up_proj` = [w2; w1]).
The LLM's linears are tensor-parallel and its layers split across pipeline stages; the vision tower
(`qwenvl.model.vision`) is replicated on every rank. The rotary tables and log-n scale follow
SPEC 5 exactly (`positions.py`); vLLM's attention keeps the paged KV cache.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import SupportsMRoPE, SupportsMultiModal, SupportsPP, SupportsQuant
from vllm.model_executor.models.utils import (
    PPMissingLayer,
    is_pp_missing_parameter,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.sequence import IntermediateTensors

from ..config import LLMConfig, QwenVLConfig
from ..model.llm import Rotary
from ..model.vision import VisionTransformer
from .config import require_qwenvl_config
from .positions import QwenPositions, request_positions
from .processor import (
    EMBEDDINGS,
    PIXELS,
    QwenVLDummyInputsBuilder,
    QwenVLMultiModalProcessor,
    QwenVLProcessingInfo,
)

# the checkpoint's MLP inputs that load into the merged projection, and their shard there:
# SiluAndMul computes silu(first) * second, and the MLP is w1(x) * silu(w2(x))
MERGED_MLP = {"w2": 0, "w1": 1}


class QWenAttention(nn.Module):
    def __init__(self, llm: LLMConfig, cache_config, quant_config, prefix: str):
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        if llm.num_attention_heads % tp_size:
            raise ValueError(
                f"num_attention_heads {llm.num_attention_heads} is not a multiple of the "
                f"tensor-parallel size {tp_size}"
            )
        self.heads = llm.num_attention_heads // tp_size
        self.head_dim = llm.kv_channels
        heads = llm.num_attention_heads
        self.c_attn = QKVParallelLinear(
            llm.hidden_size,
            self.head_dim,
            heads,
            heads,
            bias=True,
            quant_config=quant_config,
            prefix=f"{prefix}.c_attn",
        )
        self.c_proj = RowParallelLinear(
            llm.projection_size,
            llm.hidden_size,
            bias=not llm.no_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.c_proj",
        )
        self.attn = Attention(
            self.heads,
            self.head_dim,
            self.head_dim**-0.5,
            num_kv_heads=self.heads,
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=f"{prefix}.attn",
        )

    def forward(self, x: torch.Tensor, rotary: Rotary, logn: torch.Tensor | None) -> torch.Tensor:
        qkv, _ = self.c_attn(x)
        tokens = qkv.shape[0]
        # this rank's [q | k | v] heads, turned as qwenvl turns them (`TorchOps.rotate_and_store`)
        qkv = qkv.view(tokens, 1, 3, self.heads, self.head_dim)
        query, key = rotary.apply(qkv[:, :, :2]).unbind(2)
        if logn is not None:
            query = query * logn[:, :, None, None]
        value = qkv[:, :, 2]
        out = self.attn(query.reshape(tokens, -1), key.reshape(tokens, -1), value.reshape(tokens, -1))
        return self.c_proj(out)[0]


class QWenMLP(nn.Module):
    def __init__(self, llm: LLMConfig, quant_config, prefix: str):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            llm.hidden_size,
            [llm.mlp_width] * 2,
            bias=not llm.no_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.gate_up_proj",
        )
        self.c_proj = RowParallelLinear(
            llm.mlp_width,
            llm.hidden_size,
            bias=not llm.no_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.c_proj",
        )
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.gate_up_proj(x)[0]))[0]


class QWenBlock(nn.Module):
    def __init__(self, llm: LLMConfig, cache_config, quant_config, prefix: str):
        super().__init__()
        self.ln_1 = RMSNorm(llm.hidden_size, eps=llm.layer_norm_epsilon)
        self.attn = QWenAttention(llm, cache_config, quant_config, f"{prefix}.attn")
        self.ln_2 = RMSNorm(llm.hidden_size, eps=llm.layer_norm_epsilon)
        self.mlp = QWenMLP(llm, quant_config, f"{prefix}.mlp")

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, rotary: Rotary, logn: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the MLP's output, the residual stream before it): the next norm adds the two."""
        if residual is None:
            x, residual = self.ln_1(x), x
        else:
            x, residual = self.ln_1(x, residual)
        x, residual = self.ln_2(self.attn(x, rotary, logn), residual)
        return self.mlp(x), residual


@support_torch_compile(
    # tokens along dim 0; positions are [channels, tokens] (M-RoPE rows)
    dynamic_arg_dims={"input_ids": 0, "positions": -1, "intermediate_tensors": 0, "inputs_embeds": 0}
)
class QWenModel(nn.Module):
    """The checkpoint's `transformer`: wte, this stage's blocks, ln_f, and the vision tower."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: QwenVLConfig = vllm_config.model_config.hf_config
        llm = config.llm
        cache_config, quant_config = vllm_config.cache_config, vllm_config.quant_config
        pp = get_pp_group()
        self.wte = (
            VocabParallelEmbedding(llm.vocab_size, llm.hidden_size, prefix=f"{prefix}.wte")
            if pp.is_first_rank
            else PPMissingLayer()
        )
        self.start_layer, self.end_layer, self.h = make_layers(
            llm.num_hidden_layers,
            lambda prefix: QWenBlock(llm, cache_config, quant_config, prefix),
            prefix=f"{prefix}.h",
        )
        self.ln_f = (
            RMSNorm(llm.hidden_size, eps=llm.layer_norm_epsilon) if pp.is_last_rank else PPMissingLayer()
        )
        # every rank holds the tower: vLLM profiles the image encoder on each pipeline stage
        self.visual = VisionTransformer(config.vision)
        self.positions = QwenPositions(llm, vllm_config.model_config.max_model_len)
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], llm.hidden_size
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.wte(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        if get_pp_group().is_first_rank:
            x = inputs_embeds if inputs_embeds is not None else self.wte(input_ids)
            residual = None
        else:
            x, residual = intermediate_tensors["hidden_states"], intermediate_tensors["residual"]
        # vLLM hands M-RoPE models one row of positions per channel: the first is ours
        rotary, logn = self.positions(positions[0], x.dtype)
        for block in islice(self.h, self.start_layer, self.end_layer):
            x, residual = block(x, residual, rotary, logn)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": x, "residual": residual})
        return self.ln_f(x, residual)[0]


@MULTIMODAL_REGISTRY.register_processor(
    QwenVLMultiModalProcessor, info=QwenVLProcessingInfo, dummy_inputs=QwenVLDummyInputsBuilder
)
class QWenLMHeadModel(nn.Module, SupportsMultiModal, SupportsPP, SupportsMRoPE, SupportsQuant):
    packed_modules_mapping = {"gate_up_proj": list(MERGED_MLP)}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        model_config = vllm_config.model_config
        config = model_config.hf_config
        require_qwenvl_config(config)
        config.check()
        self.config = config
        self.llm_config = llm = config.llm
        self.position_rows = model_config.mrope_num_dims
        self.transformer = QWenModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "transformer"))
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(
                llm.vocab_size,
                llm.hidden_size,
                quant_config=vllm_config.quant_config,
                prefix=maybe_prefix(prefix, "lm_head"),
            )
            if config.tie_word_embeddings:
                self.lm_head = self.lm_head.tie_weights(self.transformer.wte)
        else:
            self.lm_head = PPMissingLayer()
        self.logits_processor = LogitsProcessor(llm.vocab_size)
        self.make_empty_intermediate_tensors = self.transformer.make_empty_intermediate_tensors

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return f"Picture {i}: <img></img>"
        raise ValueError(f"Qwen-VL takes images only, not {modality}")

    def get_language_model(self) -> nn.Module:
        return self.transformer

    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list
    ) -> tuple[torch.Tensor, int]:
        return request_positions(self.llm_config, len(input_tokens), self.position_rows)

    def embed_multimodal(self, **kwargs: object) -> list[torch.Tensor]:
        """Features [256, hidden] of each picture, in the prompt's order."""
        pixels, embeddings = kwargs.get(PIXELS), kwargs.get(EMBEDDINGS)
        if pixels is not None:
            return list(self.transformer.visual(_stacked(pixels)))
        if embeddings is not None:
            return list(_stacked(embeddings))
        return []

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        return self.transformer(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        if self.quant_config is not None:
            # the quantization's own renames: GPTQ's act-order table (g_idx) unused by its kernels
            mapper = (
                self.quant_config.get_cache_scale_mapper() | self.quant_config.get_checkpoint_weight_mapper()
            )
            weights = mapper.apply(weights)
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            module, _, leaf = name.rpartition(".")
            owner, _, linear = module.rpartition(".")
            shard = MERGED_MLP.get(linear) if owner.endswith(".mlp") else None
            if shard is not None:
                name = f"{owner}.gate_up_proj.{leaf}"
            if is_pp_missing_parameter(name, self):
                continue
            param = params.get(name)
            if param is None:
                # GPTQ checkpoints (the official Int4) store zero biases for linears that have none
                if leaf == "bias" and not tensor.any():
                    continue
                raise ValueError(f"the checkpoint's tensor {name} has no place in a Qwen-VL model")
            if shard is not None:
                param.weight_loader(param, tensor, shard)
            else:
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(name)
        return loaded


def _stacked(items: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """vLLM's batched field: a tensor [N, ...], or a list of N tensors when their shapes differ."""
    return items if isinstance(items, torch.Tensor) else torch.stack(list(items))
