"""The serving engine: continuous batching and prefix reuse give exactly what generation alone gives."""

from __future__ import annotations

import asyncio
import copy
import threading

import pytest
import torch

import qwenvl.engine
from qwenvl import make_context
from qwenvl.conversation import Message, build_prompt
from qwenvl.decode import Decoder
from qwenvl.engine import (
    STEADY_STEPS,
    Engine,
    EngineBusyError,
    EngineStoppedError,
    RequestFailedError,
)
from qwenvl.generation import PromptTooLongError, SamplingParams, generate_tokens
from qwenvl.images import load_image, preprocess

pytestmark = pytest.mark.usefixtures("in_golden_dir")
GREEDY = SamplingParams(max_new_tokens=10)
IMAGE_START = 151857  # <img>


def alone(model, prompt, params=GREEDY):
    return generate_tokens(model, [prompt], params, model._features_for_ids(torch.tensor([prompt])))[0]


def drive(engine: Engine, handles, max_steps: int = 10_000) -> None:
    """Step an engine that runs no loop of its own until every handle has its last event: what
    joins which batch when depends on the order of calls here, never on the clock."""
    for _ in range(max_steps):
        if all(handle.done.is_set() for handle in handles):
            return
        engine.step()
    raise AssertionError(f"the requests did not finish in {max_steps} steps")


@pytest.mark.parametrize("decode_mode", ["auto", "plain"])
def test_concurrent_requests_equal_single_generation(tiny_model, tokenizer, decode_mode):
    prompts = [
        make_context(tokenizer, "Picture 1: <img>images/shapes.png</img>\n描述画面内容。")[1],
        make_context(tokenizer, "What is 2+2?")[1],
        tokenizer.encode("The capital of France is"),
        make_context(tokenizer, "a much longer question " * 12)[1],
    ]
    images = [[load_image("images/shapes.png")], [], [], []]
    lengths = [10, 3, 7, 10]  # rows finish at different steps while others keep decoding
    # the fourth waits, then joins mid-batch
    with Engine(tiny_model, max_batch_size=3, decode_mode=decode_mode) as engine:
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


@pytest.mark.parametrize("named_by", ["build_prompt", "the caller"])
def test_another_picture_behind_the_same_words_is_not_reused(tiny_model, tokenizer, named_by):
    """Two users ask the same question about different pictures: the second answer is about the
    second picture, not read from the first one's keys and values; also when the caller's prompt
    gives both pictures the same reference."""
    prompts, images = [], []
    with Engine(tiny_model) as engine:
        for name in ("shapes.png", "texture.png"):
            image = load_image(f"images/{name}")
            if named_by == "build_prompt":
                prompt = build_prompt(tokenizer, Message([image, "What is in this picture?"])).ids
            else:
                prompt = make_context(tokenizer, "Picture 1: <img>x.png</img>\nWhat is in this picture?")[1]
            prompts.append(prompt)
            images.append(image)
            handle = engine.submit(prompt, GREEDY, [image])
            got = list(handle)
        assert handle.reused_tokens <= prompts[1].index(IMAGE_START)  # words before the picture only
    features = tiny_model.transformer.visual(preprocess([images[1]], 448))
    assert got == generate_tokens(tiny_model, [prompts[1]], GREEDY, features)[0]


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


def test_rows_choosing_each_their_way_in_one_batch_equal_their_own_generation(tiny_model, tokenizer):
    """A step reads every row's token off the device at once: the greedy rows through one argmax,
    the others (sampling, a repetition penalty) each through their own choice."""
    prompt = tokenizer.encode("The capital of France is")
    kinds = [
        GREEDY,
        SamplingParams(max_new_tokens=10, do_sample=True, top_k=20, seed=5),
        SamplingParams(max_new_tokens=10, repetition_penalty=1.3),
        SamplingParams(max_new_tokens=6),
    ]
    with Engine(tiny_model, max_batch_size=4) as engine:
        handles = [engine.submit(prompt, params) for params in kinds]
        outputs = [list(handle) for handle in handles]
    assert outputs == [alone(tiny_model, prompt, params) for params in kinds]


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


def test_run_while_serves_from_the_calling_thread(tiny_model, tokenizer):
    prompt = tokenizer.encode("The capital of France is")
    engine = Engine(tiny_model)
    threads = []

    def client():
        handle = engine.submit(prompt, GREEDY)
        threads.append(threading.current_thread())
        return list(handle)

    assert engine.run_while(client) == alone(tiny_model, prompt)
    assert threads[0] is not threading.current_thread()
    with pytest.raises(EngineStoppedError, match="start it again"):
        engine.submit(prompt, GREEDY)  # run_while stopped it
    assert engine.run_while(client) == alone(tiny_model, prompt)  # and serves again


def test_run_while_raises_what_its_work_raised_and_fails_what_is_left(tiny_model, tokenizer):
    prompt = tokenizer.encode("Tell me a story")
    engine = Engine(tiny_model, max_batch_size=1)
    handles = []

    def client():
        handles.extend(engine.submit(prompt, SamplingParams(max_new_tokens=500)) for _ in range(2))
        next(iter(handles[0]))  # the first runs; the second waits for its slot
        raise KeyError("the client broke")

    with pytest.raises(KeyError, match="the client broke"):
        engine.run_while(client)
    for handle in handles:
        with pytest.raises(EngineStoppedError):
            list(handle)


def test_stop_before_run_returns_at_once(tiny_model):
    engine = Engine(tiny_model)
    engine.stop()
    engine.run()  # returns: nothing to wait for
    engine.start().stop()  # start clears the stop


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


def test_a_steady_batch_decodes_through_its_own_decoder(tiny_model, tokenizer):
    prompts = [tokenizer.encode("The capital of France is"), tokenizer.encode("Tell me a story")]
    params = SamplingParams(max_new_tokens=3 * STEADY_STEPS)
    engine = Engine(tiny_model, max_batch_size=2)
    first = engine.submit(prompts[0], params)
    engine.step()
    assert engine.steady_batches == 1  # alone, nothing waiting: from its first step, as generate
    for _ in range(2 * STEADY_STEPS - 1):
        engine.step()
    assert engine.steady_batches == 1
    # joins when fewer than STEADY_STEPS of the first's tokens are left: the pair changes (the
    # first ends) before it is steady, then the second runs alone long enough to be
    joined = engine.submit(prompts[1], params)
    drive(engine, [first, joined])
    assert engine.steady_batches == 2
    assert list(first) == alone(tiny_model, prompts[0], params)
    assert list(joined) == alone(tiny_model, prompts[1], params)


def test_short_batches_keep_the_plain_step(tiny_model, tokenizer):
    prompt = tokenizer.encode("The capital of France is")
    short = SamplingParams(max_new_tokens=STEADY_STEPS)  # too few steps left after the first token
    with Engine(tiny_model) as engine:
        assert list(engine.submit(prompt, short)) == alone(tiny_model, prompt, short)
    assert engine.steady_batches == 0


def test_decode_mode_is_checked(tiny_model):
    with pytest.raises(ValueError, match="decode mode is one of .*, not 'compile'"):
        Engine(tiny_model, decode_mode="compile")
    with pytest.raises(ValueError, match="'cuda_graph' needs the model on a CUDA device, not cpu"):
        Engine(tiny_model, decode_mode="cuda_graph")
    assert Engine(tiny_model).decode_mode == "static"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_graphed_engine_equals_the_plain_one(tiny_model, tokenizer):
    model = copy.deepcopy(tiny_model).cuda()
    prompts = [tokenizer.encode("The capital of France is"), tokenizer.encode("a b c d e f g h i j " * 7)]
    params = SamplingParams(max_new_tokens=4 * STEADY_STEPS)

    def answers(mode):
        with Engine(model, decode_mode=mode) as engine:
            handles = [engine.submit(p, params) for p in prompts]
            return [list(h) for h in handles], engine.steady_batches

    graphed, steady = answers("auto")
    assert steady >= 1
    assert graphed == answers("static")[0]


# -- one request's failure is its own ------------------------------------------------------------


def test_a_request_whose_token_choice_fails_fails_alone(tiny_model, tokenizer):
    """A bad request in a batch of three good ones: it fails, they return what they return alone."""
    prompt = tokenizer.encode("The capital of France is")
    good = [
        GREEDY,
        SamplingParams(max_new_tokens=10, do_sample=True, top_k=20, seed=5),
        SamplingParams(max_new_tokens=7, repetition_penalty=1.3),
    ]
    # built directly, past from_config's checks: a NaN temperature makes the sampling raise
    bad = SamplingParams(max_new_tokens=10, do_sample=True, temperature=float("nan"))
    engine = Engine(tiny_model, max_batch_size=4)
    handles = [engine.submit(prompt, params) for params in (good[0], bad, *good[1:])]
    drive(engine, handles)
    with pytest.raises(RequestFailedError, match="choosing its next token"):
        list(handles[1])
    assert [list(h) for h in handles[:1] + handles[2:]] == [alone(tiny_model, prompt, p) for p in good]
    assert engine.running == 0


def test_a_decode_step_that_fails_for_one_row_fails_that_request_alone(tiny_model, tokenizer, monkeypatch):
    bad_prompt = tokenizer.encode("Hi")
    good_prompts = [make_context(tokenizer, q)[1] for q in ("What is 2+2?", "Name a colour.", "Count to 3.")]
    fails_at = len(bad_prompt) + 2  # the step feeding the bad row's third token
    assert min(len(p) for p in good_prompts) > fails_at  # no good row ever holds that many tokens

    class FailingDecoder(Decoder):
        def step(self, tokens):
            if bool((self.cache.lengths == fails_at).any()):
                raise RuntimeError("out of memory (simulated)")
            return super().step(tokens)

    monkeypatch.setattr(qwenvl.engine, "Decoder", FailingDecoder)
    engine = Engine(tiny_model, max_batch_size=4)
    handles = [engine.submit(p, GREEDY) for p in (good_prompts[0], bad_prompt, *good_prompts[1:])]
    drive(engine, handles)
    with pytest.raises(RequestFailedError, match="decoding"):
        list(handles[1])
    monkeypatch.undo()
    assert [list(h) for h in handles[:1] + handles[2:]] == [alone(tiny_model, p) for p in good_prompts]


def test_a_request_whose_prefill_fails_fails_alone(tiny_model, tokenizer, monkeypatch):
    prompts = [tokenizer.encode("The capital of France is"), tokenizer.encode("Tell me a story")]

    class FailingDecoder(Decoder):
        def prefill(self, rows, image_features=None):
            if list(rows[0]) == prompts[1]:
                raise RuntimeError("broken prompt (simulated)")
            return super().prefill(rows, image_features)

    monkeypatch.setattr(qwenvl.engine, "Decoder", FailingDecoder)
    engine = Engine(tiny_model, max_batch_size=4)
    handles = [engine.submit(p, GREEDY) for p in prompts]
    drive(engine, handles)
    with pytest.raises(RequestFailedError, match="preparing its prompt"):
        list(handles[1])
    assert list(handles[0]) == alone(tiny_model, prompts[0])


def test_a_temperature_too_small_to_sample_decodes_greedily(tiny_model, tokenizer):
    prompt = tokenizer.encode("The capital of France is")
    tiny_temperature = SamplingParams(max_new_tokens=10, do_sample=True, temperature=1e-40, seed=1)
    engine = Engine(tiny_model)
    handle = engine.submit(prompt, tiny_temperature)
    drive(engine, [handle])
    assert list(handle) == alone(tiny_model, prompt) == alone(tiny_model, prompt, tiny_temperature)


def test_a_requests_pictures_are_released_once_encoded(tiny_model, tokenizer):
    import gc
    import weakref

    prompt = make_context(tokenizer, "Picture 1: <img>images/shapes.png</img>\nWhat is it?")[1]
    image = load_image("images/shapes.png")
    released = weakref.ref(image)
    engine = Engine(tiny_model)
    handle = engine.submit(prompt, SamplingParams(max_new_tokens=20), [image])
    del image
    engine.step()  # the prefill and a step: the request decodes on
    gc.collect()
    assert released() is None and not handle.done.is_set()
    drive(engine, [handle])
