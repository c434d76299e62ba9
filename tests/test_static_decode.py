"""Shape-stable decode steps give the same logits as the plain decode step."""

from __future__ import annotations

import copy

import pytest
import torch

from qwenvl import fused_decode
from qwenvl.cache import KVCache
from qwenvl.generation import SamplingParams, decode_step, generate_tokens, prefill
from qwenvl.model.llm import attention_kernels
from qwenvl.static_decode import DecodeRunner

pytestmark = pytest.mark.usefixtures("in_golden_dir")


def decode_with(model, prompts, steps, advance):
    capacity = max(map(len, prompts)) + steps + 1
    device = next(model.parameters()).device
    cache = KVCache(model.transformer.llm_config, len(prompts), capacity, device=device)
    logits = prefill(model, prompts, cache)
    outputs = []
    with torch.no_grad():
        for _ in range(steps):
            tokens = logits.argmax(-1)
            outputs.append(tokens)
            logits = advance(cache)(tokens)
    return torch.stack(outputs, 1), logits


def test_static_steps_equal_plain_steps(tiny_model, tokenizer):
    """Rows of different lengths, one past seq_length (64) so NTK and log-n are in play."""
    prompts = [tokenizer.encode("The capital of France is"), tokenizer.encode("a b c d e f g h i j " * 7)]
    plain_tokens, plain_logits = decode_with(
        tiny_model, prompts, 8, lambda c: lambda t: decode_step(tiny_model, t, c)
    )
    runners = {}

    def static(cache):
        return runners.setdefault(id(cache), DecodeRunner(tiny_model, cache, "static"))

    static_tokens, static_logits = decode_with(tiny_model, prompts, 8, static)
    assert torch.equal(static_tokens, plain_tokens)
    torch.testing.assert_close(static_logits, plain_logits, atol=1e-5, rtol=1e-5)


def test_cuda_graph_mode_needs_cuda(tiny_model):
    cache = KVCache(tiny_model.transformer.llm_config, 1, 8)
    with pytest.raises(ValueError, match="CUDA"):
        DecodeRunner(tiny_model, cache, "cuda_graph")
    with pytest.raises(ValueError, match="'fast'"):
        DecodeRunner(tiny_model, cache, "fast")


def test_attention_never_uses_cudnn():
    """cuDNN would build a plan for every new prompt length (tens of ms before a first token)."""
    with attention_kernels():
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (the benchmarks check it there too)")
@pytest.mark.parametrize(
    "fused, dependent_launch", [(False, False), (True, False), (True, True)]
)  # fmt: skip
@pytest.mark.parametrize("rows", [1, 2])  # one row: the layers' products through fused_decode.matvec
def test_cuda_graph_steps_equal_plain_steps(
    tiny_model, tokenizer, fused, dependent_launch, rows, monkeypatch
):
    if fused and not fused_decode.available(torch.device("cuda")):
        pytest.skip("needs Triton")
    if dependent_launch and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("needs Hopper or later")
    monkeypatch.setattr(fused_decode, "DEPENDENT_LAUNCH", dependent_launch)
    model = copy.deepcopy(tiny_model).cuda()
    prompts = [tokenizer.encode("The capital of France is"), tokenizer.encode("a b c d e f g h i j " * 7)]
    prompts = prompts[-rows:]

    def decode(make_advance) -> torch.Tensor:
        capacity = max(map(len, prompts)) + 9
        cache = KVCache(model.transformer.llm_config, len(prompts), capacity, device="cuda")
        logits = prefill(model, prompts, cache)
        advance, outputs = make_advance(cache), []
        with torch.no_grad():
            for _ in range(8):
                outputs.append(logits.argmax(-1))
                logits = advance(outputs[-1])
        return torch.stack(outputs, 1)

    plain = decode(lambda cache: lambda tokens: decode_step(model, tokens, cache))
    graphed = decode(lambda cache: DecodeRunner(model, cache, "cuda_graph", fused=fused))
    assert torch.equal(graphed, plain)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (the benchmarks check it there too)")
def test_generation_reads_each_step_off_the_gpu_while_the_next_runs(tiny_model, tokenizer):
    """stream_tokens reads a step's tokens while the GPU runs the next: the tokens of a loop that
    waits for each step, and a stop word still ends the row where it comes."""
    model = copy.deepcopy(tiny_model).cuda()
    prompts = [tokenizer.encode("The capital of France is"), tokenizer.encode("a b c d e f g h i j " * 7)]
    waited, _ = decode_with(model, prompts, 8, lambda cache: lambda tokens: decode_step(model, tokens, cache))
    for mode in ("plain", "cuda_graph"):
        params = SamplingParams(max_new_tokens=8, decode_mode=mode)
        assert generate_tokens(model, prompts, params) == waited.tolist(), mode
    stop = waited[0, 2].item()
    params = SamplingParams(max_new_tokens=8, stop_words_ids=((stop,),))
    first = waited[0].tolist()
    assert generate_tokens(model, prompts[:1], params)[0] == first[: first.index(stop) + 1]
    # nucleus sampling as Qwen-VL-Chat's defaults ask, the vocabulary sorted on the GPU: one seed, one reply
    sampled = SamplingParams(max_new_tokens=8, do_sample=True, top_p=0.3, seed=1)
    replies = [generate_tokens(model, prompts, sampled) for _ in range(2)]
    assert replies[0] == replies[1] and all(len(row) == 8 for row in replies[0])
