"""Generation: cached decoding equals a full forward, batches equal single rows, sampling, stopping."""

from __future__ import annotations

import pytest
import torch

from qwenvl import make_context
from qwenvl.decode import Decoder, sampling
from qwenvl.generation import (
    PromptTooLongError,
    SamplingParams,
    choose_tokens,
    filter_top_k,
    filter_top_p,
    generate_tokens,
    stream_tokens,
)

pytestmark = pytest.mark.usefixtures("in_golden_dir")


def prompt_of(tokenizer, text: str, length: int | None = None) -> list[int]:
    ids = tokenizer.encode(text)
    if length is not None:
        ids = (ids * (length // len(ids) + 1))[:length]
    return ids


@pytest.mark.parametrize(("mode", "backend"), [("plain", "torch"), ("static", "cpu")])
def test_cached_decode_equals_full_forward(tiny_model, tokenizer, mode, backend):
    """Past seq_length (64) too: prompt 70 + 10 new tokens keeps the same NTK alpha and uses log-n."""
    for length in (9, 70):
        prompt = prompt_of(tokenizer, "The capital of France is a city with", length)
        new = generate_tokens(tiny_model, [prompt], SamplingParams(max_new_tokens=10))[0]
        decoder = Decoder(tiny_model, 1, length + 10, mode=mode, ops=backend)
        with torch.no_grad():
            step_logits = [decoder.prefill([prompt])[0]]
            for token in new[:-1]:
                step_logits.append(decoder.step(torch.tensor([token]))[0])
            full = tiny_model(torch.tensor([prompt + new])).logits[0]
        expected = full[length - 1 : length - 1 + len(new)]
        torch.testing.assert_close(torch.stack(step_logits), expected, atol=1e-4, rtol=1e-4)


def test_batch_rows_equal_single_rows(tiny_model, tokenizer):
    prompts = [
        make_context(tokenizer, "Picture 1: <img>images/shapes.png</img>\n描述画面内容。")[1],
        prompt_of(tokenizer, "The capital of France is"),
        prompt_of(tokenizer, "a long prompt past the sequence length ", 90),
        make_context(tokenizer, "What is 2+2?")[1],
    ]
    params = SamplingParams(max_new_tokens=12)
    alone = [
        tiny_model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=12)[0, len(p) :].tolist()
        for p in prompts
    ]
    features = tiny_model._features_for_ids(torch.tensor([prompts[0]]))
    together = generate_tokens(tiny_model, prompts, params, features)
    assert together == alone


def test_generate_accepts_left_padded_batches(tiny_model, tokenizer):
    short, long = tokenizer.encode("Hello"), tokenizer.encode("The capital of France is")
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (len(long) - len(short)) + short, long])
    mask = torch.tensor([[0] * (len(long) - len(short)) + [1] * len(short), [1] * len(long)])
    out = tiny_model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=5)
    alone = tiny_model.generate(torch.tensor([short]), do_sample=False, max_new_tokens=5)
    assert out[0, : len(short) + 5].tolist() == alone[0].tolist()


def test_sampling_is_reproducible_with_a_seed(tiny_model, tokenizer):
    prompt = prompt_of(tokenizer, "Once upon a time")
    params = SamplingParams(max_new_tokens=16, do_sample=True, temperature=1.5, top_p=0.9, top_k=50, seed=7)
    first = generate_tokens(tiny_model, [prompt], params)
    assert generate_tokens(tiny_model, [prompt], params) == first
    torch.manual_seed(1234)
    a = tiny_model.generate(torch.tensor([prompt]), do_sample=True, top_p=0.9, max_new_tokens=16)
    torch.manual_seed(1234)
    b = tiny_model.generate(torch.tensor([prompt]), do_sample=True, top_p=0.9, max_new_tokens=16)
    assert a.tolist() == b.tolist()


def test_stop_words_end_a_row(tiny_model, tokenizer):
    prompt = prompt_of(tokenizer, "The capital of France is")
    free = generate_tokens(tiny_model, [prompt], SamplingParams(max_new_tokens=8))[0]
    stop = free[2]
    params = SamplingParams(max_new_tokens=8, stop_words_ids=((stop,),))
    assert generate_tokens(tiny_model, [prompt], params)[0] == free[: free.index(stop) + 1]
    eos = SamplingParams(max_new_tokens=8, eos_token_id=stop)
    assert generate_tokens(tiny_model, [prompt], eos)[0] == free[: free.index(stop) + 1]


def test_streaming_yields_each_step(tiny_model, tokenizer):
    prompt = prompt_of(tokenizer, "The capital of France is")
    steps = list(stream_tokens(tiny_model, [prompt], SamplingParams(max_new_tokens=6)))
    assert [s[0] for s in steps] == generate_tokens(tiny_model, [prompt], SamplingParams(max_new_tokens=6))[0]


def test_on_cpu_a_step_is_computed_only_once_asked_for(tiny_model, tokenizer, monkeypatch):
    """(On a GPU the next step is queued before the host reads a token: tests/test_decoder.py.)"""
    steps = []
    step = Decoder.step
    monkeypatch.setattr(Decoder, "step", lambda self, tokens: steps.append(1) or step(self, tokens))
    tokens = stream_tokens(
        tiny_model, [prompt_of(tokenizer, "The capital of France is")], SamplingParams(max_new_tokens=3)
    )
    next(tokens)
    assert steps == []  # the first token comes from the prefill
    next(tokens)
    assert len(steps) == 1
    assert len(list(tokens)) == 1 and len(steps) == 2  # none past the last token


def test_chat_stream_grows_to_the_chat_reply(tiny_model, tokenizer):
    replies = list(tiny_model.chat_stream(tokenizer, "What is 2+2?", do_sample=False, max_new_tokens=10))
    response, _ = tiny_model.chat(tokenizer, "What is 2+2?", do_sample=False, max_new_tokens=10)
    assert replies and replies[-1] == response
    assert all(later.startswith(earlier) for earlier, later in zip(replies, replies[1:], strict=False))


def test_every_decode_mode_gives_the_plain_greedy_tokens(tiny_model, tokenizer):
    """Rows of different lengths, one past seq_length (64) so NTK and log-n are in play; "compile"
    runs inductor's CPU kernels, "cuda_graph" needs a GPU (tested there by the benchmarks), "auto"
    is "static" on CPU."""
    prompts = [prompt_of(tokenizer, "The capital of France is"), prompt_of(tokenizer, "a b c d e f ", 70)]
    outputs = {}
    for mode in ("plain", "static", "compile", "auto"):
        params = SamplingParams(max_new_tokens=12, decode_mode=mode)
        outputs[mode] = generate_tokens(tiny_model, prompts, params)
    assert outputs["static"] == outputs["plain"] and outputs["compile"] == outputs["plain"]
    assert outputs["auto"] == outputs["plain"]
    assert all(len(row) == 12 for row in outputs["plain"])
    reply, _ = tiny_model.chat(
        tokenizer, "What is 2+2?", do_sample=False, max_new_tokens=8, decode_mode="plain"
    )
    assert tiny_model.chat(tokenizer, "What is 2+2?", do_sample=False, max_new_tokens=8)[0] == reply


def test_prompt_longer_than_the_context_is_refused(tiny_model, tokenizer):
    too_long = [tokenizer.encode("x")[0]] * (tiny_model.config.max_position_embeddings + 1)
    with pytest.raises(PromptTooLongError, match="8193 tokens"):
        generate_tokens(tiny_model, [too_long], SamplingParams(max_new_tokens=1))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"top_p": 0.0}, "top_p"),
        ({"do_sample": True, "temperature": 0}, "temperature"),
        ({"do_sample": True, "temperature": float("nan")}, "temperature"),
        ({"do_sample": True, "temperature": float("inf")}, "temperature"),
        ({"top_p": float("nan")}, "top_p"),
        ({"repetition_penalty": float("nan")}, "repetition_penalty"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"decode_mode": "fastest"}, "decode_mode"),
    ],
)
def test_bad_sampling_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams.from_config(None, **kwargs)


def test_generation_config_defaults_flow_into_params(tiny_model):
    params = SamplingParams.from_config(tiny_model.generation_config)
    assert params.do_sample and params.top_p == 0.3 and params.top_k == 0 and params.max_new_tokens == 512
    assert SamplingParams.from_config(tiny_model.generation_config, do_sample=False).do_sample is False


@pytest.mark.parametrize("temperature", [1e-40, 1e-6])
def test_temperatures_too_small_to_sample_choose_greedily(temperature):
    """logits / 1e-40 overflows fp32 to inf (a NaN softmax); below 1e-5 the choice is the argmax."""
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, -1.0, 4.0]])
    params = SamplingParams(do_sample=True, temperature=temperature)
    assert params.greedy
    assert choose_tokens(logits, params, None, torch.Generator().manual_seed(0)).tolist() == [1, 0]
    assert not SamplingParams(do_sample=True, temperature=1e-4).greedy


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert torch.isinf(filter_top_k(logits, 2)).tolist() == [[False, False, True, True]]
    probs = logits.softmax(-1)[0]  # ~[0.64, 0.24, 0.09, 0.03]
    assert probs[0] < 0.7 < probs[0] + probs[1]
    assert torch.isinf(filter_top_p(logits, 0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_top_p(logits, 0.01)).tolist() == [[False, True, True, True]]


def test_repetition_penalty_lowers_seen_tokens():
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    seen = torch.tensor([[True, False, True]])
    params = SamplingParams(repetition_penalty=1.2)
    assert choose_tokens(logits, params, seen, None).item() == 1
    assert choose_tokens(logits, SamplingParams(), seen, None).item() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_agrees_with_fp32(tiny_checkpoint, tiny_model, tokenizer, dtype):
    """bf16 keeps 8 mantissa bits, fp16 11: logits of a 2-layer model stay within a few 1e-2 of fp32,
    and the log-probability of fp32's greedy choice stays close."""
    from qwenvl import QwenVLForCausalLM

    half = QwenVLForCausalLM.from_pretrained(tiny_checkpoint, dtype=dtype)
    assert half.dtype == dtype
    _, prompt = make_context(tokenizer, "Picture 1: <img>images/shapes.png</img>\n描述画面内容。")
    with torch.no_grad():
        ref = tiny_model(torch.tensor([prompt])).logits[0].float()
        got = half(torch.tensor([prompt])).logits[0].float()
    tolerance = 0.08 if dtype == torch.bfloat16 else 0.02
    assert (got - ref).abs().max() < tolerance * ref.abs().max()
    ref_lp, got_lp = ref.log_softmax(-1), got.log_softmax(-1)
    choice = ref.argmax(-1, keepdim=True)
    assert (ref_lp.gather(-1, choice) - got_lp.gather(-1, choice)).abs().max() < 0.1


def test_nucleus_sampling_stays_inside_the_nucleus():
    from qwenvl.decode.sampling import _sample_nucleus

    logits = torch.full((1, 5000), -10.0)
    logits[0, [3, 17, 42]] = torch.tensor([5.0, 4.5, 1.0])  # the top two hold > 90% of the mass
    generator = torch.Generator().manual_seed(0)
    drawn = {_sample_nucleus(logits, 0.9, generator).item() for _ in range(200)}
    assert drawn == {3, 17}
    flat = torch.zeros(1, 5000)  # a nucleus wider than the candidates: the caller sorts instead
    assert _sample_nucleus(flat, 0.5, generator) is None
    params = SamplingParams(do_sample=True, top_p=0.5, seed=0)
    assert 0 <= choose_tokens(flat, params, None, generator).item() < 5000


def test_nucleus_sampling_without_candidates_stays_inside_the_nucleus(monkeypatch):
    """As on a GPU: the whole vocabulary sorted, no wait for the device to know the nucleus's width."""

    assert sampling.nucleus_by_candidates(torch.device("cpu"))
    assert not sampling.nucleus_by_candidates(torch.device("cuda"))
    monkeypatch.setattr(sampling, "nucleus_by_candidates", lambda device: False)
    monkeypatch.setattr(sampling, "_sample_nucleus", None)  # never called
    logits = torch.full((1, 5000), -10.0)
    logits[0, [3, 17, 42]] = torch.tensor([5.0, 4.5, 1.0])
    params = SamplingParams(do_sample=True, top_p=0.9)
    generator = torch.Generator().manual_seed(0)
    assert {choose_tokens(logits, params, None, generator).item() for _ in range(200)} == {3, 17}


def test_generate_drives_a_transformers_streamer(tiny_model, tokenizer):
    from transformers import TextIteratorStreamer

    prompt = prompt_of(tokenizer, "The capital of France is")
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    out = tiny_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=6, streamer=streamer)
    assert "".join(streamer) == tokenizer.decode(out[0, len(prompt) :])


def test_forward_scores_right_padded_rows_like_single_rows(tiny_model, tokenizer):
    short, long = tokenizer.encode("Hello"), tokenizer.encode("The capital of France is")
    pad = [tokenizer.pad_token_id] * (len(long) - len(short))
    ids = torch.tensor([short + pad, long])
    mask = torch.tensor([[1] * len(short) + [0] * len(pad), [1] * len(long)])
    with torch.no_grad():
        batch = tiny_model(ids, attention_mask=mask).logits
        alone = tiny_model(torch.tensor([short])).logits
    torch.testing.assert_close(batch[0, : len(short)], alone[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="right-padded"):
        tiny_model(ids.flip(1), attention_mask=mask.flip(1))
