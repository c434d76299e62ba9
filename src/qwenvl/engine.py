"""A serving engine: continuous batching and prefix reuse over the generation functions.

One worker loop owns the model, in a thread of its own (`start`) or in the caller's (`run`, the
faster one on CPU: see there). Requests wait in a bounded queue; between decode steps the
worker admits them (encoding their images once and prefilling them on their own), then merges
them into the running batch, whose rows keep their own lengths in one KV cache. Finished
sequences are remembered so that a later prompt that starts the same way (the next turn of a
conversation) reuses their keys and values instead of re-encoding the image and the history.

Each running row is a `decode.Sequence` (its token choice and stopping, as in `generate`); the
batch decodes through a `decode.Decoder` over its cache, static steps at first and, once the batch
has run unchanged for a while, in the engine's decode mode: on CUDA its step recorded once as a
CUDA graph and replayed, as `generate` decodes. Rows joining or leaving make a new cache, and the
decoder goes with the old one.

A request that fails (its prefill, the choice of its next token, or a decode step that fails
for it alone) ends with RequestFailedError; the other rows of the batch go on untouched.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from .cache import KVCache
from .conversation import image_name
from .decode.backends import ops_for
from .decode.decoder import Decoder, resolve_mode
from .decode.sampling import DECODE_MODES as DECODER_MODES
from .decode.sampling import PromptTooLongError, SamplingParams
from .decode.sequence import ChoiceError, choose_next
from .decode.sequence import Sequence as DecodingSequence
from .generation import max_new_tokens, new_cache
from .host_memory import return_free_memory
from .model.ops import TorchOps
from .model.qwenvl import image_span_starts
from .placement import model_devices, module_device
from .prefix_cache import PrefixCache
from .request_handle import (
    EngineBusyError,
    EngineStoppedError,
    Event,
    RequestFailedError,
    RequestHandle,
)
from .vision_graphs import encode_pixels

logger = logging.getLogger(__name__)
T = TypeVar("T")

# the decoder's modes but "compile", which would compile again for every new batch
DECODE_MODES = tuple(mode for mode in DECODER_MODES if mode != "compile")
# A batch gets its own decoder in the engine's mode once each of its rows may take this many
# more steps, and it has taken as many unchanged or nothing waits to join it: capturing a graph
# costs about three steps (two warm-up steps and the capture), and a batch that changes every few
# steps would pay that again and again.
STEADY_STEPS = 8


@dataclass
class _Request:
    handle: RequestHandle
    prompt: list[int]
    params: SamplingParams
    images: list  # PIL images, one per image span of the prompt, in order
    pictures: tuple[str, ...] = ()  # their digests (conversation.image_name), taken at prefill


@dataclass
class _Row:
    """A running sequence: its request and its decoding state."""

    request: _Request
    sequence: DecodingSequence
    # "stop" or "length" (the sequence's), "cancelled" or "error": set once its last event is out
    finish_reason: str | None = None


def _failure(stage: str, cause: BaseException) -> RequestFailedError:
    logger.error("a request failed while %s", stage, exc_info=cause)
    error = RequestFailedError(stage)
    error.__cause__ = cause
    return error


class Engine:
    """Continuous batching over one model; thread-safe `submit`, tokens streamed per request."""

    def __init__(
        self,
        model,
        max_batch_size: int = 16,
        max_queue: int = 64,
        prefix_cache_entries: int = 8,
        decode_mode: str = "auto",
        ops: TorchOps | str | None = None,
    ):
        """`decode_mode`: one of DECODE_MODES, the mode of a steady batch's decoder (the steps
        before it are static ones; "plain": every step). `ops`: the decoders' backend, an object
        or a name (default: the device's)."""
        self.model = model
        self.max_batch_size = max_batch_size
        self._waiting: queue.Queue[_Request] = queue.Queue(maxsize=max_queue)
        self._prefixes = PrefixCache(prefix_cache_entries)
        self._ids = itertools.count(1)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None  # start()'s
        self._looping = threading.Event()  # set while run() loops, in whichever thread
        self._rows: list[_Row] = []
        self._cache: KVCache | None = None
        self._decoder: Decoder | None = None  # the running batch's, over self._cache
        self._steady_decoder = False  # whether it is the steady batch's (in the engine's mode)
        self._steps_unchanged = 0  # steps the running batch has taken since it last changed
        self.steady_batches = 0  # batches that ran long enough unchanged to get their own decoder
        self._prefilled_since_idle = False
        param = model.lm_head.weight  # where the logits come out and the rows' tokens are chosen
        self.dtype, self.device = param.dtype, param.device
        if decode_mode not in DECODE_MODES:
            raise ValueError(f"the engine's decode mode is one of {DECODE_MODES}, not {decode_mode!r}")
        self.decode_mode = resolve_mode(decode_mode, self.device, len(model_devices(model)) > 1)
        # built now: its copies of the weights, its packing, once
        self.ops = ops if isinstance(ops, TorchOps) else ops_for(model, ops)

    # -- life cycle --------------------------------------------------------------------------------

    def start(self) -> Engine:
        """Run the worker loop in a thread of its own until `stop()`."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self.run, name="qwenvl-engine", daemon=True)
            self._thread.start()
        return self

    def run(self) -> None:
        """Run the worker loop in the calling thread until `stop()` is called (at once if it already
        was); the requests still in flight then fail with EngineStoppedError.

        On CPU, run it in the thread that loaded the model, and let the callers submit from other
        threads (`run_while`). PyTorch's OpenMP threads wait between parallel regions by spinning
        only while the process has no more of them than cores, and every thread that runs parallel
        work keeps a team of its own for good. A worker thread beside the one that loaded the model
        holds a second team: all of them then sleep between regions and take a while to wake up
        (bf16 decode of the mid benchmark model on 2 cores: 34 ms per token instead of 30).
        """
        self._looping.set()
        try:
            with torch.inference_mode():
                while not self._stop.is_set():
                    self.step()
        finally:
            self._looping.clear()
            self._fail_all(EngineStoppedError("the engine stopped"))

    def run_while(self, work: Callable[[], T]) -> T:
        """`work()` in a new thread while this one runs the worker loop (`run`); the loop stops when
        `work` returns, and its result comes back (or its exception is raised)."""
        outcome: dict[str, Any] = {}
        self._stop.clear()  # this call's stop comes from `call`, which starts after this line

        def call() -> None:
            try:
                outcome["value"] = work()
            except BaseException as error:  # raised again in the calling thread
                outcome["error"] = error
            finally:
                self.stop()

        thread = threading.Thread(target=call, name="qwenvl-engine-client", daemon=True)
        thread.start()
        self.run()
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def stop(self) -> None:
        """End the worker loop: `start`'s thread is joined, `run` returns after its current step."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        elif not self._looping.is_set():  # nothing runs: fail what waits here
            self._fail_all(EngineStoppedError("the engine stopped"))

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def waiting(self) -> int:
        return self._waiting.qsize()

    # -- requests ----------------------------------------------------------------------------------

    def submit(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        images: Sequence = (),
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> RequestHandle:
        """Queue a prompt; `images` are the PIL images of its image spans, in order."""
        prompt = list(prompt)
        spans = len(image_span_starts(torch.as_tensor([prompt]), llm_image_start(self.model)))
        if spans != len(images):
            raise ValueError(f"the prompt has {spans} image spans but {len(images)} images were given")
        limit = self.model.config.max_position_embeddings
        if not prompt or len(prompt) >= limit:
            raise PromptTooLongError(
                f"the prompt is {len(prompt)} tokens; the model's context window is {limit}"
            )
        if self._stop.is_set():
            raise EngineStoppedError("the engine was stopped; start it again (start or run_while) first")
        handle = RequestHandle(next(self._ids), loop)
        handle.prompt_tokens = len(prompt)
        try:
            self._waiting.put_nowait(_Request(handle, prompt, params, list(images)))
        except queue.Full:
            raise EngineBusyError(f"{self._waiting.maxsize} requests are already waiting") from None
        return handle

    # -- the worker --------------------------------------------------------------------------------

    def step(self) -> None:
        """One turn of the worker loop: admit waiting requests (waiting a moment for one if nothing
        runs), decode one token for every running row, retire the finished rows. `run` calls it
        until stopped; tests call it to drive the engine a step at a time."""
        try:
            self._admit(block=not self._rows)
            self._retire_finished()
            if self._rows:
                self._step()
                self._retire_finished()
        except Exception as error:  # a failure no row can be blamed for: the running rows fail
            logger.exception("engine step failed")
            self._fail_running(error)
        if self._prefilled_since_idle and not self._rows:
            self._prefilled_since_idle = False
            if self.device.type == "cpu":
                return_free_memory()  # going idle: what the prefills and the pictures took goes back

    def _admit(self, block: bool) -> None:
        while len(self._rows) < self.max_batch_size:
            try:
                request = self._waiting.get(timeout=0.05) if block else self._waiting.get_nowait()
            except queue.Empty:
                return
            block = False
            if request.handle.cancelled.is_set():
                request.handle._publish(Event(finish_reason="cancelled"))
                continue
            self._prefilled_since_idle = True
            try:
                row, cache, logits = self._prefill(request)
            except Exception as error:
                request.handle._publish(Event(error=_failure("preparing its prompt", error)))
                continue
            finally:
                request.images = []  # encoded now (or failed): the pictures need not stay in memory
            self._rows.append(row)
            self._set_cache(cache if self._cache is None else KVCache.concat([self._cache, cache]))
            self._emit_next([row], logits)

    def _prefill(self, request: _Request) -> tuple[_Row, KVCache, torch.Tensor]:
        """A batch-1 cache for the request (reusing a stored prefix when exact), its row, and the
        logits of its first token [1, V]."""
        model, prompt, params = self.model, request.prompt, request.params
        cache = new_cache(model, [prompt], params)
        # digests, not references: a caller's ids may name different pictures alike
        request.pictures = tuple(image_name(image) for image in request.images)
        start = self._prefixes.restore(model, prompt, cache, request.pictures)
        request.handle.reused_tokens = start
        span_starts = [p for _, p in image_span_starts(torch.as_tensor([prompt]), llm_image_start(model))]
        first_new_image = sum(1 for p in span_starts if p < start)
        features = None
        if request.images[first_new_image:]:
            from .images import preprocess

            pixels = preprocess(request.images[first_new_image:], model.transformer.vision_config.image_size)
            visual = model.transformer.visual
            features = encode_pixels(visual, pixels.to(module_device(visual)))
        logits = Decoder(model, cache=cache, mode="static", ops=self.ops).prefill([prompt[start:]], features)
        sequence = DecodingSequence.start(
            prompt, params, max_new_tokens(model, [prompt], params), model.config.vocab_size, self.device
        )
        return _Row(request, sequence), cache, logits

    def _step(self) -> None:
        """Decode one token for every running row."""
        tokens = torch.as_tensor([row.sequence.generated[-1] for row in self._rows], device=self.device)
        try:
            logits = self._decoding().step(tokens)
        except Exception:
            logger.exception("a decode step of %d rows failed; decoding them one by one", len(self._rows))
            logits = self._decode_rows_alone(tokens)
        self._steps_unchanged += 1
        self._emit_next(self._rows, logits)

    def _decode_rows_alone(self, tokens: torch.Tensor) -> torch.Tensor:
        """The failed step again, a row at a time: the rows it fails for fail, the others go on
        with what the batch would have given them (a batch computes each row as it would alone)."""
        # the step may have advanced the lengths before failing
        self._cache.set_lengths([row.sequence.held for row in self._rows])
        survivors, caches, logits = [], [], []
        for i, row in enumerate(self._rows):
            cache = self._cache.select([i])
            try:
                logits.append(
                    Decoder(self.model, cache=cache, mode="static", ops=self.ops).step(tokens[i : i + 1])
                )
            except Exception as error:
                row.request.handle._publish(Event(error=_failure("decoding", error)))
                continue
            survivors.append(row)
            caches.append(cache)
        self._rows = survivors
        self._set_cache(KVCache.concat(caches) if caches else None)
        return torch.cat(logits) if logits else torch.empty(0)

    def _decoding(self) -> Decoder:
        """The running batch's decoder: static steps (whose shapes stay put, which spares the host
        syncs), then the engine's own mode once the batch is steady."""
        if self.decode_mode == "plain":
            if self._decoder is None:
                self._decoder = Decoder(self.model, cache=self._cache, mode="plain", ops=self.ops)
            return self._decoder
        if not self._steady_decoder and self._steady():
            self._decoder = Decoder(self.model, cache=self._cache, mode=self.decode_mode, ops=self.ops)
            self._steady_decoder = True
            self.steady_batches += 1
        if self._decoder is None:
            self._decoder = Decoder(self.model, cache=self._cache, mode="static", ops=self.ops)
        return self._decoder

    def _steady(self) -> bool:
        """Whether the batch is worth its own decoder: each row may take STEADY_STEPS more steps,
        and no request waits to join it (a request alone then decodes graphed from its first step,
        as `generate` does) or it has run STEADY_STEPS steps unchanged."""
        left = min(row.sequence.max_new - len(row.sequence.generated) for row in self._rows)
        return left >= STEADY_STEPS and (self._waiting.empty() or self._steps_unchanged >= STEADY_STEPS)

    def _set_cache(self, cache: KVCache | None) -> None:
        """The running batch changed: its new cache; the old one's decoder (and graph) goes."""
        self._cache, self._decoder, self._steady_decoder, self._steps_unchanged = cache, None, False, 0

    def _emit_next(self, rows: Sequence[_Row], logits: torch.Tensor) -> None:
        """Choose the next token of each of `rows` from its row of `logits` [len(rows), V] and
        publish it, with its end if it ends."""
        choosing = []
        for i, row in enumerate(rows):
            handle = row.request.handle
            if handle.cancelled.is_set() or row.sequence.max_new <= 0:
                row.finish_reason = "cancelled" if handle.cancelled.is_set() else "length"
                handle._publish(Event(finish_reason=row.finish_reason))
            else:
                choosing.append(i)
        if not choosing:
            return
        if len(choosing) < len(rows):
            logits = logits[torch.as_tensor(choosing, device=logits.device)]
        chosen = [rows[i] for i in choosing]
        choice = choose_next([r.sequence for r in chosen], logits)
        for row, token, logprobs in zip(chosen, choice.read(), choice.logprobs(), strict=True):
            if isinstance(token, ChoiceError):
                row.finish_reason = "error"
                row.request.handle._publish(Event(error=_failure("choosing its next token", token)))
                continue
            row.sequence.add(token)
            row.finish_reason = row.sequence.finish_reason
            row.request.handle._publish(Event(token, row.finish_reason, logprobs=logprobs))

    def _retire_finished(self) -> None:
        """Drop finished rows from the batch, remembering their sequences for prefix reuse."""
        keep = [i for i, row in enumerate(self._rows) if row.finish_reason is None]
        if len(keep) == len(self._rows):
            return
        for i, row in enumerate(self._rows):
            if row.finish_reason in ("stop", "length") and row.sequence.generated:
                self._remember(i, row)
        self._rows = [self._rows[i] for i in keep]
        self._set_cache(self._cache.select(keep) if keep else None)

    def _remember(self, index: int, row: _Row) -> None:
        # the cache holds the prompt and every generated token but the last, which was never fed back
        tokens, pictures = row.request.prompt + row.sequence.generated[:-1], row.request.pictures
        self._prefixes.keep(tokens, self._cache.select([index]), pictures)

    def _fail_running(self, error: BaseException) -> None:
        for row in self._rows:
            row.request.handle._publish(Event(error=error))
        self._rows = []
        self._set_cache(None)

    def _fail_all(self, error: BaseException) -> None:
        self._fail_running(error)
        while True:
            try:
                self._waiting.get_nowait().handle._publish(Event(error=error))
            except queue.Empty:
                return


def llm_image_start(model) -> int:
    return model.transformer.vision_config.image_start_id
