"""What transformers users pass to generate and chat: honoured, or refused with the option named.

Each model run costs a Decoder and a few steps; the tests share one greedy run (`free`) as the
reference and check what needs no run at the level of `generation_options`.
"""

from __future__ import annotations

import threading

import huggingface_hub.constants
import pytest
import torch
from transformers import (
    AutoModelForImageTextToText,
    GenerationConfig,
    LogitsProcessorList,
    TextIteratorStreamer,
    pipeline,
)
from transformers.generation.streamers import BaseStreamer

from qwenvl import QwenVLConfig, decode_reply, make_context
from qwenvl.chat_format import DEFAULT_SYSTEM
from qwenvl.generation import PromptTooLongError
from qwenvl.generation_options import generation_options

GREEDY = {"do_sample": False}
NO_END = {"eos_token_id": []}  # no end-of-text id: rows run to their limit


@pytest.fixture(scope="module")
def prompt(tokenizer) -> list[int]:
    return tokenizer.encode("The capital of France is")


@pytest.fixture(scope="module")
def free(tiny_model, prompt) -> list[int]:
    """The tiny model's 8 greedy tokens after the prompt, nothing stopping them."""
    out = tiny_model.generate(torch.tensor([prompt]), max_new_tokens=8, **NO_END, **GREEDY)
    return out[0, len(prompt) :].tolist()


class Recorder(BaseStreamer):
    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, value):
        self.puts.append(value.tolist())

    def end(self):
        self.ended += 1


def new_tokens(out, prompt) -> list[int]:
    return out[0, len(prompt) :].tolist()


def options_of(model, options: dict, config=None, width: int = 6):
    return generation_options("generate", model.generation_config, config, options, prompt_width=width)


def test_generate_takes_transformers_ways_of_passing_the_prompt_and_settings(tiny_model, prompt, free):
    config = GenerationConfig(max_new_tokens=4, do_sample=False, **NO_END)
    assert (
        new_tokens(tiny_model.generate(inputs=torch.tensor([prompt]), generation_config=config), prompt)
        == free[:4]
    )
    # input_ids by name and unbatched; max_length counts the prompt; transformers' output object;
    # options about how transformers computes, and the neutral values of those refused, change nothing
    quiet = {
        "use_cache": False,
        "num_beams": 1,
        "logits_processor": LogitsProcessorList(),
        "output_scores": False,
    }
    out = tiny_model.generate(
        input_ids=torch.tensor(prompt),
        max_length=len(prompt) + 3,
        return_dict_in_generate=True,
        **quiet,
        **NO_END,
        **GREEDY,
    )
    assert out.sequences[0].tolist() == prompt + free[:3]


def test_lengths_counting_the_prompt_and_a_config_falling_back_to_the_models(tiny_model):
    params = options_of(tiny_model, {"max_length": 10, "min_length": 8}, width=6).params
    assert (params.max_new_tokens, params.min_new_tokens) == (4, 2)
    # as in transformers, the new-token count wins over the length
    assert options_of(tiny_model, {"max_length": 10, "max_new_tokens": 7}).params.max_new_tokens == 7
    # a passed config's unset values are the model's: Qwen-VL-Chat samples with top_p 0.3
    options = options_of(tiny_model, {}, GenerationConfig(max_new_tokens=5))
    assert options.params.do_sample and options.params.top_p == 0.3 and options.params.max_new_tokens == 5
    assert options.pad_token_id == 151643
    assert options_of(tiny_model, {"eos_token_id": [5, 6]}).params.eos_ids == (5, 6)


def test_eos_token_id_lists_and_min_new_tokens(tiny_model, prompt, free):
    ends = [free[4], free[1]]  # whichever comes first ends the row
    out = tiny_model.generate(torch.tensor([prompt]), max_new_tokens=6, eos_token_id=ends, **GREEDY)
    first_end = next(k for k, token in enumerate(free) if token in ends)
    assert new_tokens(out, prompt) == free[: first_end + 1]
    # the end cannot come among the first three tokens: another takes its place, the row goes on
    eos = free[1]
    out = tiny_model.generate(
        torch.tensor([prompt]), max_new_tokens=5, eos_token_id=eos, min_new_tokens=3, **GREEDY
    )
    held = new_tokens(out, prompt)
    unchanged = free.index(eos)  # the tokens before the end's first place are chosen as before
    assert held[:unchanged] == free[:unchanged] and eos not in held[:3]
    assert len(held) == 5 or held.index(eos) == len(held) - 1


def clean_text(tokenizer, token: int) -> str:
    text = tokenizer.decode(token)
    return "" if "\ufffd" in text else text.strip()


def test_stop_strings_end_generate_and_cut_the_chat_reply(tiny_model, tokenizer, prompt, free):
    stop = next(clean_text(tokenizer, t) for t in free[2:] if clean_text(tokenizer, t))
    expected = next(k for k in range(len(free)) if stop in tokenizer.decode(free[: k + 1]))
    with pytest.raises(ValueError, match="tokenizer="):
        tiny_model.generate(torch.tensor([prompt]), stop_strings=stop, **GREEDY)
    out = tiny_model.generate(
        torch.tensor([prompt]), max_new_tokens=8, stop_strings=[stop], tokenizer=tokenizer, **NO_END, **GREEDY
    )
    assert new_tokens(out, prompt) == free[: expected + 1]

    reply, _ = tiny_model.chat(tokenizer, "What is 2+2?", max_new_tokens=8, **GREEDY)
    # two characters from within the reply, no space (the reply is stripped) nor a half character
    pairs = (reply[i : i + 2] for i in range(1, len(reply) - 2))
    cut = next((pair for pair in pairs if not any(c.isspace() or c == "\ufffd" for c in pair)), None)
    if cut is not None:  # the tiny model's reply may be too short to hold a stop string
        shorter, _ = tiny_model.chat(
            tokenizer, "What is 2+2?", max_new_tokens=8, stop_strings=[cut], **GREEDY
        )
        assert shorter == reply[: reply.index(cut)]


def test_streamers_see_the_prompt_then_each_token_then_the_end(tiny_model, tokenizer, prompt, free):
    recorder = Recorder()
    tiny_model.generate(torch.tensor([prompt]), max_new_tokens=3, streamer=recorder, **NO_END, **GREEDY)
    assert recorder.puts == [[prompt], *[[t] for t in free[:3]]] and recorder.ended == 1

    too_long = [prompt[0]] * (tiny_model.config.max_position_embeddings + 1)
    failed = Recorder()
    with pytest.raises(PromptTooLongError):
        tiny_model.generate(torch.tensor([too_long]), max_new_tokens=2, streamer=failed)
    assert failed.ended == 1  # a reader waiting on a TextIteratorStreamer is not left hanging

    # chat shows a streamer its prompt and the reply's tokens, as the original's chat did
    in_chat, in_stream = Recorder(), Recorder()
    reply, _ = tiny_model.chat(tokenizer, "What is 2+2?", max_new_tokens=4, streamer=in_chat, **GREEDY)
    _, chat_prompt = make_context(tokenizer, "What is 2+2?", system=DEFAULT_SYSTEM)
    assert in_chat.puts[0] == [chat_prompt] and in_chat.ended == 1
    assert decode_reply(tokenizer, [token for (token,) in in_chat.puts[1:]]) == reply
    list(tiny_model.chat_stream(tokenizer, "What is 2+2?", max_new_tokens=4, streamer=in_stream, **GREEDY))
    assert in_stream.puts == in_chat.puts and in_stream.ended == 1

    # chat failing before its first token ends the streamer too: an unknown option, then a
    # picture that cannot be read (found when the reply's tokens are asked for)
    bad_option, bad_picture = Recorder(), Recorder()
    with pytest.raises(ValueError):
        tiny_model.chat(tokenizer, "What is 2+2?", streamer=bad_option, temprature=0.5)
    with pytest.raises(Exception, match="no-such-picture"):
        list(tiny_model.chat_stream(tokenizer, "<img>no-such-picture.png</img>", streamer=bad_picture))
    assert bad_option.ended == 1 and bad_option.puts == [] and bad_picture.ended == 1


def test_a_text_iterator_streamer_in_another_thread(tiny_model, tokenizer, prompt, free):
    """transformers' documented pattern; a call that fails ends the stream too. (The timeout only
    turns a hang into a failure.)"""
    for options, expected in (({"max_new_tokens": 4}, tokenizer.decode(free[:4])), ({"num_beams": 2}, "")):
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=120)
        inputs = tokenizer("The capital of France is", return_tensors="pt")
        call = {**inputs, **options, "streamer": streamer, **NO_END, **GREEDY}
        errors = []

        def generate(call=call, errors=errors):
            try:
                tiny_model.generate(**call)
            except ValueError as error:
                errors.append(error)

        thread = threading.Thread(target=generate)
        thread.start()
        assert "".join(streamer) == expected
        thread.join()
        assert bool(errors) == ("num_beams" in options)


def test_num_return_sequences_samples_each_prompt_again(tiny_model, prompt):
    ids, sampled = torch.tensor([prompt]), {"do_sample": True, "top_k": 5, "top_p": 1.0, "seed": 5, **NO_END}
    out = tiny_model.generate(ids, num_return_sequences=3, max_new_tokens=2, **sampled)
    together = tiny_model.generate(ids.repeat(3, 1), max_new_tokens=2, **sampled)
    assert out.shape == (3, len(prompt) + 2) and out.tolist() == together.tolist()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_beams": 2}, "generate\\(\\) cannot honour num_beams=2 \\(beam search"),
        ({"generation_config": GenerationConfig(num_beams=3)}, "num_beams=3 \\(beam search"),
        ({"num_return_sequences": 2, "do_sample": False}, "do_sample=True"),
        ({"temprature": 0.5}, "'temprature' \\(did you mean 'temperature'\\?\\)"),
        ({"assistant_model": object()}, "assistant_model=.* \\(assisted"),
        ({"logits_processor": LogitsProcessorList([lambda ids, scores: scores])}, "logits_processor"),
        ({"output_scores": True}, "output_scores=True"),
        ({"no_repeat_ngram_size": 3, "min_p": 0.1}, "min_p=0.1 .*no_repeat_ngram_size=3"),
        ({"max_new_tokens": None, "max_length": 3}, "max_length=3 leaves no room"),
        ({"max_new_tokens": -1}, "max_new_tokens must be"),
        ({"pixel_values": torch.zeros(1)}, "unknown generate\\(\\) keyword argument: 'pixel_values'"),
    ],
)
def test_what_generate_cannot_honour_is_refused_by_name(tiny_model, prompt, options, message):
    with pytest.raises(ValueError, match=message):
        tiny_model.generate(torch.tensor([prompt]), **{"max_new_tokens": 2, **options})


def test_the_original_chat_keywords_and_refusals(tiny_model, tokenizer):
    reply, history = tiny_model.chat(
        tokenizer, "Hi", history=None, append_history=False, max_new_tokens=2, max_window_size=6144, **GREEDY
    )
    assert history == [] and isinstance(reply, str)
    with pytest.raises(ValueError, match="use chat_stream"):
        tiny_model.chat(tokenizer, "Hi", stream=True)
    with pytest.raises(ValueError, match="returns one reply"):
        tiny_model.chat(tokenizer, "Hi", do_sample=True, num_return_sequences=2)
    with pytest.raises(ValueError, match="did you mean 'top_p'"):
        tiny_model.chat_stream(tokenizer, "Hi", topp=0.5)  # refused at the call, before any reply is read
    with pytest.raises(ValueError, match="'append_history'"):
        tiny_model.chat_stream(tokenizer, "Hi", append_history=False)


def test_the_config_holds_token_ids_without_saving_them():
    config = QwenVLConfig()
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (None, None, None)
    assert not {"pad_token_id", "bos_token_id", "eos_token_id"} & set(config.to_diff_dict())
    assert QwenVLConfig(pad_token_id=151643).to_diff_dict()["pad_token_id"] == 151643


def test_the_image_text_to_text_pipeline_names_the_api_to_use(tiny_checkpoint, tiny_model, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="model.chat\\(tokenizer, query\\)"):
        AutoModelForImageTextToText.from_pretrained(tiny_checkpoint)
    with pytest.raises(ValueError, match="model.chat\\(tokenizer, query\\).*qwenvl.engine.Engine"):
        pipeline("image-text-to-text", model=str(tiny_checkpoint))
    with pytest.raises(Exception, match="processor"):  # transformers' own refusal: no processor to find
        pipeline("image-text-to-text", model=tiny_model)


def test_the_text_generation_pipeline_drives_generate(tiny_model, tokenizer, free):
    generator = pipeline("text-generation", model=tiny_model, tokenizer=tokenizer)
    (out,) = generator("The capital of France is", max_new_tokens=3, do_sample=False, return_full_text=False)
    assert out["generated_text"] == tokenizer.decode(free[:3])
