"""The decoder: every mode and backend gives the plain step's tokens; its modes and backends are
chosen once, when it is built."""

from __future__ import annotations

import copy

import pytest
import torch

from qwenvl.decode import BACKENDS, Decoder, KernelSettings
from qwenvl.decode.backends import ops_for
from qwenvl.decode.cpu_ops import CpuOps
from qwenvl.generation import SamplingParams, generate_tokens
from qwenvl.model import TORCH_OPS
from qwenvl.model.llm import attention_kernels

pytestmark = pytest.mark.usefixtures("in_golden_dir")


def decode(model, prompts, steps: int, mode: str, ops=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens [B, steps] and the last logits, through one decoder."""
    decoder = Decoder(model, len(prompts), max(map(len, prompts)) + steps + 1, mode=mode, ops=ops)
    logits = decoder.prefill(prompts)
    outputs = []
    for _ in range(steps):
        outputs.append(logits.argmax(-1))
        logits = decoder.step(outputs[-1])
    return torch.stack(outputs, 1), logits


def prompts_of(tokenizer) -> list[list[int]]:
    """Rows of different lengths, one past seq_length (64) so NTK and log-n are in play."""
    return [tokenizer.encode("The capital of France is"), tokenizer.encode("a b c d e f g h i j " * 7)]


@pytest.mark.parametrize("mode", ["static", "compile"])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_every_mode_and_backend_gives_the_plain_steps(tiny_model, tokenizer, mode, backend):
    if mode == "compile" and backend == "cpu":
        pytest.skip("a compiled step takes the torch backend (inductor cannot trace packed products)")
    prompts = prompts_of(tokenizer)
    plain_tokens, plain_logits = decode(tiny_model, prompts, 8, "plain", "torch")
    tokens, logits = decode(tiny_model, prompts, 8, mode, backend)
    assert torch.equal(tokens, plain_tokens)
    # the static step reads the whole capacity under a mask: sums of other lengths, float noise
    torch.testing.assert_close(logits, plain_logits, atol=1e-5, rtol=1e-5)


def test_the_backend_is_chosen_once_when_built(tiny_model):
    decoder = Decoder(tiny_model, 1, 8)
    assert decoder.mode == "static" and isinstance(decoder.ops, CpuOps)  # "auto" on CPU
    assert Decoder(tiny_model, 1, 8, mode="compile").ops is TORCH_OPS
    assert Decoder(tiny_model, 1, 8, ops="torch").ops is TORCH_OPS
    assert ops_for(tiny_model) is decoder.ops  # built once for the model, handed out again
    assert set(BACKENDS) == {"torch", "triton", "cpu"}


def test_modes_and_backends_are_checked(tiny_model):
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        Decoder(tiny_model, 1, 8, mode="cuda_graph")
    with pytest.raises(ValueError, match="unknown decode mode 'fast'"):
        Decoder(tiny_model, 1, 8, mode="fast")
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        Decoder(tiny_model, 1, 8, ops="cuda")
    with pytest.raises(ValueError, match="a cache, or the rows and capacity"):
        Decoder(tiny_model)


def test_a_forward_makes_no_copy_of_the_weights(tiny_model, monkeypatch):
    """The CPU backend's copies are made when it is built, never by the model's forward."""
    built = []
    init = CpuOps.__init__
    monkeypatch.setattr(CpuOps, "__init__", lambda self, *a, **k: built.append(1) or init(self, *a, **k))
    with torch.no_grad():
        tiny_model(torch.tensor([[1, 2, 3]]))
    assert built == []


def test_attention_never_uses_cudnn():
    """cuDNN would build a plan for every new prompt length (tens of ms before a first token)."""
    with attention_kernels():
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()


NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@NEEDS_CUDA
@pytest.mark.parametrize(
    "backend, dependent_launch", [("torch", False), ("triton", False), ("triton", True)]
)  # fmt: skip
@pytest.mark.parametrize("rows", [1, 2])  # one row: the layers' products through kernels.matvec
def test_cuda_graph_steps_equal_plain_steps(tiny_model, tokenizer, backend, dependent_launch, rows):
    from qwenvl.decode import backends, kernels

    if backend == "triton" and not kernels.available():
        pytest.skip("needs Triton")
    if dependent_launch and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("needs Hopper or later")
    model = copy.deepcopy(tiny_model).cuda()
    prompts = prompts_of(tokenizer)[-rows:]
    ops = backends.build(model, backend, KernelSettings(dependent_launch=dependent_launch))
    plain, _ = decode(model, prompts, 8, "plain", ops)
    graphed, _ = decode(model, prompts, 8, "cuda_graph", ops)
    assert torch.equal(graphed, plain)


@NEEDS_CUDA
def test_generation_reads_each_step_off_the_gpu_while_the_next_runs(tiny_model, tokenizer):
    """stream_tokens reads a step's tokens while the GPU runs the next: the tokens of a loop that
    waits for each step, and a stop word still ends the row where it comes."""
    model = copy.deepcopy(tiny_model).cuda()
    prompts = prompts_of(tokenizer)
    waited, _ = decode(model, prompts, 8, "plain")
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
