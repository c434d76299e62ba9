"""A request's decoding state: the one place tokens are chosen and sequences stop."""

from __future__ import annotations

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
