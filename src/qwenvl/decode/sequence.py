"""One request's decoding state, and the choice of every running sequence's next token at once.

A `Sequence` holds what deciding a request's tokens needs: its prompt, the tokens chosen so far,
its sampling parameters and random generator, the ids it has seen (for a repetition penalty),
and when it stops (end-of-text, a stop word, its token limit). `generation.stream_tokens` and
the serving engine both decode with it, so a token is chosen and a sequence ends in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Rows
from dataclasses import dataclass, field

import torch

from ..transfers import to_device, to_host
from .sampling import SamplingParams, choose_tokens


@dataclass
class Sequence:
    prompt: list[int]
    params: SamplingParams
    max_new: int  # tokens it may get (the context window may allow fewer than params say)
    generated: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    seen: torch.Tensor | None = None  # [1, V] bool: ids of the prompt and the tokens so far
    finish_reason: str | None = None  # "stop" or "length" once finished

    @classmethod
    def start(
        cls,
        prompt: Rows[int],
        params: SamplingParams,
        max_new: int,
        vocab_size: int,
        device: torch.device,
        generator: torch.Generator | None = None,
    ) -> Sequence:
        """A sequence about to choose its first token. `generator`: shared by the sequences of one
        call (which then sample together, as one batch); by default its own, from params.seed."""
        if generator is None and params.seed is not None:
            generator = torch.Generator(device=device).manual_seed(params.seed)
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(1, vocab_size, dtype=torch.bool, device=device)
            seen[0, torch.as_tensor(list(prompt), device=device)] = True
        return cls(list(prompt), params, max_new, generator=generator, seen=seen)

    def add(self, token: int) -> None:
        """Record the chosen `token`; the sequence finishes on end-of-text, a stop word or its limit."""
        self.generated.append(token)
        params = self.params
        if token == params.eos_token_id or any(
            stop and self.generated[-len(stop) :] == list(stop) for stop in params.stop_words_ids
        ):
            self.finish_reason = "stop"
        elif len(self.generated) >= self.max_new:
            self.finish_reason = "length"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def held(self) -> int:
        """Tokens its cache row holds before the next step: the prompt and every token chosen but
        the last, which the next step feeds."""
        return len(self.prompt) + len(self.generated) - 1


class ChoiceError(RuntimeError):
    """A sequence's next token could not be chosen: its choice raised, or its logits were not finite."""


class Choice:
    """Next tokens of several sequences, chosen on the device: `tokens` [B] can feed the next step
    before they are read. A row whose choice failed holds 0 there."""

    def __init__(self, tokens: torch.Tensor, finite: torch.Tensor, failed: dict[int, ChoiceError]):
        self.tokens, self._finite, self._failed = tokens, finite, failed

    def read(self) -> list[int | ChoiceError]:
        """Each row's token, or its ChoiceError: one wait for the device, whatever the rows."""
        return self.read_later()()

    def read_later(self) -> Callable[[], list[int | ChoiceError]]:
        """Starts copying the tokens off the device; the function returned waits for that copy
        alone (on a GPU, not for what was queued after it, such as the next step) and reads them."""
        both = torch.stack([self.tokens, self._finite.long()])
        fetch = to_host(both) if both.is_cuda else both.tolist
        return lambda: self._values(*fetch())

    def _values(self, tokens: list[int], finite: list[int]) -> list[int | ChoiceError]:
        out: list[int | ChoiceError] = []
        for i, (token, is_finite) in enumerate(zip(tokens, finite, strict=True)):
            if i in self._failed:
                out.append(self._failed[i])
            elif not is_finite:
                out.append(ChoiceError("the model's logits are not finite"))
            else:
                out.append(token)
        return out


def choose_next(sequences: Rows[Sequence], logits: torch.Tensor) -> Choice:
    """The next token of each sequence from its row of `logits` [B, V].

    Greedy rows without a repetition penalty share one argmax, whatever else their parameters
    say; sampled rows that share their parameters and generator sample together (one call's
    batch, as transformers does); every other row chooses alone. A row whose choice raises gets a
    ChoiceError and the others are untouched; sampled rows draw from their logits with non-finite
    values zeroed, since a GPU's multinomial given NaN fails the whole device, not the row. Each
    sequence's seen ids take its new token on the device.
    """
    batch = len(sequences)
    tokens = torch.zeros(batch, dtype=torch.long, device=logits.device)
    finite = torch.isfinite(logits).all(-1)
    failed: dict[int, ChoiceError] = {}
    for rows, params, generator in _groups(sequences):
        whole = len(rows) == batch  # one call's rows all alike (generate): no gather, no scatter
        index = None if whole else to_device(torch.tensor(rows), logits.device)
        group = logits if whole else logits[index]
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.cat([sequences[i].seen for i in rows])
        if not params.greedy:
            group = torch.nan_to_num(group, nan=0.0, posinf=0.0, neginf=0.0)
        try:
            chosen = choose_tokens(group, params, seen, generator)
        except Exception as error:
            if len(rows) == 1:
                failed[rows[0]] = _choice_error(error)
                continue
            for k, i in enumerate(rows):  # find the rows it fails for
                try:
                    tokens[i] = choose_tokens(group[k : k + 1], params, sequences[i].seen, generator)[0]
                except Exception as row_error:
                    failed[i] = _choice_error(row_error)
            continue
        if whole:
            tokens = chosen
        else:
            tokens[index] = chosen
    for i, sequence in enumerate(sequences):
        if sequence.seen is not None and i not in failed:
            sequence.seen[0, tokens[i]] = True
    return Choice(tokens, finite, failed)


def _groups(sequences: Rows[Sequence]) -> list[tuple[list[int], SamplingParams, torch.Generator | None]]:
    """(rows, params, generator) of the rows that choose together."""
    greedy: list[int] = []
    groups: dict[tuple[int, int], tuple[list[int], SamplingParams, torch.Generator | None]] = {}
    for i, sequence in enumerate(sequences):
        params = sequence.params
        if params.greedy and params.repetition_penalty == 1.0:
            greedy.append(i)
        else:
            key = (id(params), id(sequence.generator)) if sequence.seen is None else (id(sequence), 0)
            groups.setdefault(key, ([], params, sequence.generator))[0].append(i)
    out = list(groups.values())
    if greedy:
        out.insert(0, (greedy, sequences[greedy[0]].params, None))
    return out


def _choice_error(cause: Exception) -> ChoiceError:
    error = ChoiceError(f"choosing the next token failed ({type(cause).__name__}: {cause})")
    error.__cause__ = cause
    return error
