"""A request's decoding state: the one place tokens are chosen and sequences stop."""

from __future__ import annotations

import pytest
import torch

from qwenvl.decode import ChoiceError, SamplingParams, Sequence, choose_next, choose_tokens

GREEDY = SamplingParams(max_new_tokens=10)


def sequence(params: SamplingParams = GREEDY, prompt=(1, 2, 3), max_new: int = 10, **kwargs) -> Sequence:
    return Sequence.start(list(prompt), params, max_new, vocab_size=50, device=torch.device("cpu"), **kwargs)


def test_a_sequence_stops_at_end_of_text_a_stop_word_or_its_limit():
    eos = sequence(SamplingParams(eos_token_id=7))
    eos.add(4)
    assert not eos.finished and eos.held == 3
    eos.add(7)
    assert eos.finish_reason == "stop" and eos.held == 4
    stop_word = sequence(SamplingParams(stop_words_ids=((5, 6),)))
    for token in (5, 1, 5, 6):
        stop_word.add(token)
    assert stop_word.finish_reason == "stop" and stop_word.generated == [5, 1, 5, 6]
    limited = sequence(max_new=2)
    limited.add(1)
    limited.add(2)
    assert limited.finish_reason == "length"


def test_each_row_chooses_what_it_would_alone():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    penalized = SamplingParams(repetition_penalty=1.5)
    kinds = [GREEDY, SamplingParams(do_sample=True, top_k=5, seed=3), penalized, GREEDY]
    rows = [sequence(params, prompt=(int(logits[2].argmax()),)) for params in kinds]
    # the penalty turns the third row away from its top token
    alone = []
    for i, params in enumerate(kinds):
        seen = sequence(params, prompt=(int(logits[2].argmax()),)).seen
        generator = torch.Generator().manual_seed(3) if params.seed is not None else None
        alone.append(int(choose_tokens(logits[i : i + 1], params, seen, generator)[0]))
    assert choose_next(rows, logits).read() == alone
    assert alone[2] != int(logits[2].argmax())
    assert rows[2].seen[0, alone[2]]  # the chosen token is seen from now on


def test_rows_of_one_call_sample_together_as_one_batch():
    torch.manual_seed(1)
    logits = torch.randn(3, 50)
    params = SamplingParams(do_sample=True, top_k=10)
    generator = torch.Generator().manual_seed(5)
    rows = [sequence(params, generator=generator) for _ in range(3)]
    expected = choose_tokens(logits, params, None, torch.Generator().manual_seed(5)).tolist()
    assert choose_next(rows, logits).read() == expected


def test_a_row_whose_choice_fails_fails_alone():
    torch.manual_seed(2)
    logits = torch.randn(3, 50)
    logits[2, 7] = float("nan")  # the model's logits of the third row are not finite
    bad = SamplingParams(do_sample=True, temperature=float("nan"))  # past from_config's checks
    rows = [sequence(), sequence(bad), sequence()]
    got = choose_next(rows, logits).read()
    assert got[0] == int(logits[0].argmax())
    assert isinstance(got[1], ChoiceError) and "choosing the next token failed" in str(got[1])
    assert isinstance(got[2], ChoiceError) and "not finite" in str(got[2])


def test_sampled_rows_never_meet_a_nan():
    """A GPU's multinomial given NaN fails the whole device: sampled rows draw from logits whose
    non-finite values are zeroed (the row is then failed by the finite check)."""
    logits = torch.full((1, 50), float("nan"))
    row = sequence(SamplingParams(do_sample=True, top_p=0.5))
    (got,) = choose_next([row], logits).read()
    assert isinstance(got, ChoiceError) and "not finite" in str(got)


def test_min_new_tokens_keeps_the_ends_from_being_chosen_until_then():
    """End-of-text ids and one-token stop words are banned while a row has fewer tokens than its
    min_new_tokens (counted as they are chosen: on a GPU the next is chosen before the last is
    added); a longer stop word cannot be banned, and only does not end the row yet."""
    params = SamplingParams(eos_token_id=(7, 9), stop_words_ids=((5,), (3, 4)), min_new_tokens=2)
    row = sequence(params)
    logits = torch.zeros(1, 50)
    logits[0, [7, 5, 9, 11]] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert choose_next([row], logits).read() == [11]
    assert choose_next([row], logits).read() == [11]  # chosen before the first is added
    assert choose_next([row], logits).read() == [7]
    for token in (3, 4):
        row.add(token)
    assert not row.finished  # (3, 4) came within the first two tokens
    row.add(7)
    assert row.finish_reason == "stop"


def test_min_new_tokens_holds_for_sampled_rows():
    params = SamplingParams(do_sample=True, eos_token_id=7, min_new_tokens=1000, seed=0)
    row = sequence(params)
    logits = torch.zeros(1, 50)
    logits[0, 7] = 20.0  # without the ban, id 7 is drawn but once in e^20 / 49
    drawn = [choose_next([row], logits).read()[0] for _ in range(20)]
    assert 7 not in drawn and all(isinstance(token, int) for token in drawn)


def test_eos_token_id_may_be_several_ids():
    assert SamplingParams.from_config(None, eos_token_id=[7, 9]).eos_ids == (7, 9)
    assert SamplingParams.from_config(None, eos_token_id=7).eos_ids == (7,)
    row = sequence(SamplingParams.from_config(None, eos_token_id=[7, 9]))
    row.add(9)
    assert row.finish_reason == "stop"


class ByteVocabulary:
    """Tokens of a few bytes each, as in a tiktoken vocabulary: "你" (e4 bd a0) is split in two."""

    pieces = (b"Hel", b"lo", b" wor", b"ld", b"\xe4\xbd", b"\xa0", b"!")

    def __len__(self) -> int:
        return len(self.pieces)

    def convert_ids_to_tokens(self, token: int) -> bytes:
        return self.pieces[token]

    def decode(self, ids) -> str:
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def test_stop_strings_end_a_row_where_the_text_first_holds_them():
    """Matched in bytes: a string may start or end inside a token, and a character split across
    tokens matches once whole; the oracle is the decoded text of each prefix."""
    vocabulary = ByteVocabulary()
    tokens = list(range(len(vocabulary)))
    for stop in ("lo w", "o", "Hello", "你", "你!", "ld!", "world"):
        params = SamplingParams.from_config(None, tokenizer=vocabulary, stop_strings=stop)
        row = sequence(params, max_new=100)
        for token in tokens:
            row.add(token)
            if row.finished:
                break
        expected = next((k for k in tokens if stop in vocabulary.decode(tokens[: k + 1])), None)
        assert (len(row.generated) - 1 if row.finished else None) == expected, stop


def test_stop_strings_need_the_tokenizer_and_unknown_names_are_refused():
    with pytest.raises(ValueError, match="tokenizer="):
        SamplingParams.from_config(None, stop_strings=["x"])
    with pytest.raises(ValueError, match="'temprature' \\(did you mean 'temperature'\\?\\)"):
        SamplingParams.from_config(None, temprature=0.5)
    with pytest.raises(ValueError, match="min_new_tokens"):
        SamplingParams.from_config(None, min_new_tokens=-1)
