"""The serving engine: continuous batching and prefix reuse give exactly what generation alone gives."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from qwenvl import make_context
from qwenvl.engine import Engine, EngineBusyError
from qwenvl.generation import PromptTooLongError, SamplingParams, generate_tokens
from qwenvl.images import load_image

pytestmark = pytest.mark.usefixtures("in_golden_dir")
GREEDY = SamplingParams(max_new_tokens=10)


def alone(model, prompt, params=GREEDY):
    return generate_tokens(model, [prompt], params, model._features_for_ids(torch.tensor([prompt])))[0]


def test_concurrent_requests_equal_single_generation(tiny_model, tokenizer):
    prompts = [
        make_context(tokenizer, "Picture 1: <img>images/shapes.png</img>\n描述画面内容。")[1],
        make_context(tokenizer, "What is 2+2?")[1],
        tokenizer.encode("The capital of France is"),
        make_context(tokenizer, "a much longer question " * 12)[1],
    ]
    images = [[load_image("images/shapes.png")], [], [], []]
    lengths = [10, 3, 7, 10]  # rows finish at different steps while others keep decoding
    with Engine(tiny_model, max_batch_size=3) as engine:  # the fourth waits, then joins mid-batch
        handles = [
            engine.submit(p, SamplingParams(max_new_tokens=n), imgs)
            for p, n, imgs in zip(prompts, lengths, images, strict=True)
        ]
        results = [list(h) for h in handles]
    for prompt, n, got in zip(prompts, lengths, results, strict=True):
        assert got == alone(tiny_model, prompt, SamplingParams(max_new_tokens=n))
    assert [h.finish_reason for h in handles] == ["length"] * 4


def test_second_turn_reuses_the_first(tiny_model, tokenizer):
    image = load_image("images/shapes.png")
    first_query = "Picture 1: <img>images/shapes.png</img>\n描述画面内容。"
    _, prompt = make_context(tokenizer, first_query)
    with Engine(tiny_model) as engine:
        reply = list(engine.submit(prompt, GREEDY, [image]))
        history = [(first_query, tokenizer.decode(reply))]
        _, second = make_context(tokenizer, "框出图中的真人", history=history)
        handle = engine.submit(second, GREEDY, [image])
        got = list(handle)
    assert handle.reused_tokens > 258  # the image span and the history were not run again
    assert got == alone(tiny_model, second)


def test_stop_words_and_sampling_seed(tiny_model, tokenizer):
    prompt = tokenizer.encode("The capital of France is")
    free = alone(tiny_model, prompt)
    params = SamplingParams(max_new_tokens=10, stop_words_ids=((free[3],),))
    sampled = SamplingParams(max_new_tokens=8, do_sample=True, top_k=20, seed=3)
    with Engine(tiny_model) as engine:
        stopped = engine.submit(prompt, params)
        assert list(stopped) == free[: free.index(free[3]) + 1]
        assert stopped.finish_reason == "stop"
        runs = [list(engine.submit(prompt, sampled)) for _ in range(2)]
    assert runs[0] == runs[1] == alone(tiny_model, prompt, sampled)


def test_cancel_frees_the_slot(tiny_model, tokenizer):
    prompt = tokenizer.encode("Tell me a story")
    with Engine(tiny_model, max_batch_size=1) as engine:
        long = engine.submit(prompt, SamplingParams(max_new_tokens=500))
        tokens = iter(long)
        next(tokens)
        long.cancel()
        assert list(engine.submit(prompt, GREEDY)) == alone(tiny_model, prompt)
        assert len(list(tokens)) < 499
    assert long.finish_reason == "cancelled"


def test_full_queue_is_refused(tiny_model, tokenizer):
    engine = Engine(tiny_model, max_queue=2)  # not started: nothing drains the queue
    prompt = tokenizer.encode("hi")
    engine.submit(prompt, GREEDY)
    engine.submit(prompt, GREEDY)
    with pytest.raises(EngineBusyError, match="2 requests"):
        engine.submit(prompt, GREEDY)


def test_bad_requests_are_refused_at_submit(tiny_model, tokenizer):
    engine = Engine(tiny_model)
    with pytest.raises(PromptTooLongError):
        engine.submit([1] * tiny_model.config.max_position_embeddings, GREEDY)
    _, with_image = make_context(tokenizer, "Picture 1: <img>a.png</img>\nhi")
    with pytest.raises(ValueError, match="1 image spans but 0 images"):
        engine.submit(with_image, GREEDY)


def test_async_streaming_from_many_threads(tiny_model, tokenizer):
    prompt = tokenizer.encode("The capital of France is")
    expected = alone(tiny_model, prompt)

    async def ask(engine):
        handle = engine.submit(prompt, GREEDY, loop=asyncio.get_running_loop())
        return [token async for token in handle.stream()]

    async def main(engine):
        return await asyncio.gather(*(ask(engine) for _ in range(6)))

    with Engine(tiny_model, max_batch_size=4) as engine:
        results = asyncio.run(main(engine))
        threaded = []
        workers = [
            threading.Thread(target=lambda: threaded.append(list(engine.submit(prompt, GREEDY))))
            for _ in range(3)
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    assert results == [expected] * 6
    assert threaded == [expected] * 3


def test_a_closed_event_loop_does_not_kill_the_engine(tiny_model, tokenizer):
    prompt = tokenizer.encode("The capital of France is")
    loop = asyncio.new_event_loop()
    with Engine(tiny_model) as engine:
        engine.submit(prompt, SamplingParams(max_new_tokens=50), loop=loop)
        loop.close()  # e.g. a server shut down with a request in flight
        assert list(engine.submit(prompt, GREEDY)) == alone(tiny_model, prompt)
