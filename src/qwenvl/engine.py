"""A serving engine: continuous batching and prefix reuse over the generation functions.

One worker loop owns the model, in a thread of its own (`start`) or in the caller's (`run`, the
faster one on CPU: see there). Requests wait in a bounded queue; between decode steps the
worker admits them (encoding their images once and prefilling them on their own), then merges
them into the running batch, whose rows keep their own lengths in one KV cache. Finished
sequences are remembered so that a later prompt that starts the same way (the next turn of a
conversation) reuses their keys and values instead of re-encoding the image and the history.

A batch that has run unchanged for a while decodes through a DecodeRunner over its cache: on CUDA
its step captured once as a CUDA graph and replayed, as `generate` decodes. Rows joining or
leaving make a new cache, and the runner goes with the old one.

A request that fails (its prefill, the choice of its next token, or a decode step that fails
for it alone) ends with RequestFailedError; the other rows of the batch go on untouched.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from . import fused_decode
from .cache import KVCache
from .conversation import image_name
from .generation import (
    PromptTooLongError,
    SamplingParams,
    choose_tokens,
    decode_step,
    is_finished,
    max_new_tokens,
    new_cache,
    prefill,
)
from .host_memory import return_free_memory
from .model.qwenvl import image_span_starts
from .prefix_cache import PrefixCache
from .static_decode import DecodeRunner, static_decode_step
from .vision_graphs import encode_pixels

logger = logging.getLogger(__name__)
T = TypeVar("T")

# "auto": "cuda_graph" on CUDA, "static" elsewhere; "plain": generation.decode_step at every step
DECODE_MODES = ("auto", "plain", "static", "cuda_graph")
# A batch gets its own runner once it has taken this many steps unchanged and each of its rows
# may take as many more: capturing a graph costs about three steps (two warm-up steps and the
# capture), and a batch that changes every few steps would pay that again and again.
STEADY_STEPS = 8


class EngineBusyError(RuntimeError):
    """The request queue is full: the caller should retry later (a server answers 503)."""


class EngineStoppedError(RuntimeError):
    """The engine was stopped before the request finished."""


class RequestFailedError(RuntimeError):
    """This request failed in the engine, while `stage`; the cause is chained. Others went on."""

    def __init__(self, stage: str):
        super().__init__(f"the request failed while {stage}")
        self.stage = stage


@dataclass
class Event:
    token: int | None = None
    finish_reason: str | None = None  # "stop" or "length" on the last event
    error: BaseException | None = None


class RequestHandle:
    """What `Engine.submit` returns: the stream of a request's tokens, and a way to cancel it."""

    def __init__(self, request_id: int, loop: asyncio.AbstractEventLoop | None):
        self.id = request_id
        self.prompt_tokens = 0
        self.reused_tokens = 0
        self.finish_reason: str | None = None
        self._loop = loop
        self._sync: queue.Queue[Event] = queue.Queue()
        self._async: asyncio.Queue[Event] | None = asyncio.Queue() if loop is not None else None
        self.cancelled = threading.Event()
        self.done = threading.Event()  # set once the engine has published the request's last event

    def cancel(self) -> None:
        """Stop generating for this request; its slot is freed at the next step."""
        self.cancelled.set()

    def _publish(self, event: Event) -> None:
        if event.finish_reason is not None or event.error is not None:
            self.done.set()
        if self._async is None:
            self._sync.put(event)
            return
        try:
            self._loop.call_soon_threadsafe(self._async.put_nowait, event)
        except RuntimeError:  # the reader's event loop is closed: nobody is listening any more
            self.cancelled.set()

    def _read(self, event: Event) -> int | None:
        if event.error is not None:
            raise event.error
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
        return event.token

    def __iter__(self) -> Iterator[int]:
        """Token ids as they are generated (blocking); ends when the request finishes."""
        while True:
            event = self._sync.get()
            token = self._read(event)
            if token is not None:
                yield token
            if event.finish_reason is not None:
                return

    async def stream(self) -> AsyncIterator[int]:
        """The same, for asyncio code (the handle must come from `submit(..., loop=...)`)."""
        if self._async is None:
            raise RuntimeError("submit the request with loop=asyncio.get_running_loop() to stream it")
        while True:
            event = await self._async.get()
            token = self._read(event)
            if token is not None:
                yield token
            if event.finish_reason is not None:
                return


@dataclass
class _Request:
    handle: RequestHandle
    prompt: list[int]
    params: SamplingParams
    images: list  # PIL images, one per image span of the prompt, in order
    pictures: tuple[str, ...] = ()  # their digests (conversation.image_name), taken at prefill


@dataclass
class _Row:
    """A running sequence: its request and what it generated so far."""

    request: _Request
    max_new: int
    generated: list[int] = field(default_factory=list)
    seen: torch.Tensor | None = None
    generator: torch.Generator | None = None
    logits: torch.Tensor | None = None  # of the next token, [V]
    finish_reason: str | None = None  # set once the row's last event is published


def choose_rows_tokens(rows: Sequence[_Row]) -> list[int | RequestFailedError]:
    """Each row's next token from its logits, read off the device at once: one wait per step, not
    one per row, and one argmax for the rows that choose greedily without a repetition penalty.

    A row whose choice raises, or whose logits are not finite, gets a RequestFailedError instead
    of a token; the other rows get what they would get alone. Sampled rows draw from their logits
    with non-finite values zeroed: a GPU's multinomial given NaN fails the whole device, not the row.
    """
    if not rows:
        return []
    chosen: list[torch.Tensor | None] = [None] * len(rows)
    finite: list[torch.Tensor | None] = [None] * len(rows)
    failed: dict[int, RequestFailedError] = {}
    plain = [i for i, row in enumerate(rows) if _plain_greedy(row.request.params)]
    if plain:  # the same choice for each of them, whatever else their parameters say
        logits = torch.stack([rows[i].logits for i in plain])
        greedy = choose_tokens(logits, rows[plain[0]].request.params, None, None)
        sound = torch.isfinite(logits).all(-1)
        for k, i in enumerate(plain):
            chosen[i], finite[i] = greedy[k : k + 1], sound[k : k + 1]
    for i, row in enumerate(rows):
        if chosen[i] is not None:
            continue
        try:
            safe = torch.nan_to_num(row.logits[None], nan=0.0, posinf=0.0, neginf=0.0)
            chosen[i] = choose_tokens(safe, row.request.params, row.seen, row.generator)
            finite[i] = torch.isfinite(row.logits).all()[None]
        except Exception as error:
            failed[i] = _failure("choosing its next token", error)
    kept = [i for i in range(len(rows)) if i not in failed]
    tokens, sound = [], []
    if kept:
        both = torch.stack(
            [torch.cat([chosen[i] for i in kept]), torch.cat([finite[i] for i in kept]).long()]
        )
        tokens, sound = both.tolist()
    out: list[int | RequestFailedError] = []
    read = iter(zip(tokens, sound, strict=True))
    for i in range(len(rows)):
        if i in failed:
            out.append(failed[i])
            continue
        token, is_finite = next(read)
        if is_finite:
            out.append(token)
        else:
            out.append(_failure("choosing its next token", FloatingPointError("non-finite logits")))
    return out


def _failure(stage: str, cause: BaseException) -> RequestFailedError:
    logger.error("a request failed while %s", stage, exc_info=cause)
    error = RequestFailedError(stage)
    error.__cause__ = cause
    return error


def _plain_greedy(params: SamplingParams) -> bool:
    return params.greedy and params.repetition_penalty == 1.0


def concat_caches(caches: Sequence[KVCache]) -> KVCache:
    """One cache holding the rows of all `caches` (capacity: the largest)."""
    capacity = max(c.capacity for c in caches)
    merged = KVCache.__new__(KVCache)
    merged.keys = torch.cat([_widen(c.keys, capacity) for c in caches], dim=1)
    merged.values = torch.cat([_widen(c.values, capacity) for c in caches], dim=1)
    merged.lengths = torch.cat([c.lengths for c in caches])
    merged.ntk_alpha = torch.cat([c.ntk_alpha for c in caches])
    merged.inv_freq = torch.cat([c.inv_freq for c in caches])
    merged.empty = False
    return merged


def _widen(tensor: torch.Tensor, capacity: int) -> torch.Tensor:
    extra = capacity - tensor.shape[3]
    if extra == 0:
        return tensor
    return torch.nn.functional.pad(tensor, (0, 0, 0, extra))


class Engine:
    """Continuous batching over one model; thread-safe `submit`, tokens streamed per request."""

    def __init__(
        self,
        model,
        max_batch_size: int = 16,
        max_queue: int = 64,
        prefix_cache_entries: int = 8,
        decode_mode: str = "auto",
    ):
        """`decode_mode`: one of DECODE_MODES; "static" and "cuda_graph" are the modes of a steady
        batch's DecodeRunner (the steps before it are static ones)."""
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
        self._runner: DecodeRunner | None = None  # the steady batch's, over self._cache
        self._steps_unchanged = 0  # steps the running batch has taken since it last changed
        self.steady_batches = 0  # batches that ran long enough unchanged to get a runner
        self._prefilled_since_idle = False
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        if decode_mode not in DECODE_MODES:
            # "compile" among them: it would compile again for every new batch
            raise ValueError(f"the engine's decode mode is one of {DECODE_MODES}, not {decode_mode!r}")
        if decode_mode == "auto":
            decode_mode = "cuda_graph" if self.device.type == "cuda" else "static"
        if decode_mode == "cuda_graph" and self.device.type != "cuda":
            raise ValueError(f"decode mode 'cuda_graph' needs the model on a CUDA device, not {self.device}")
        self.decode_mode = decode_mode
        if fused_decode.available(self.device):  # the steps' MLPs then take one product for w1 and w2
            fused_decode.pack_gate_weights(model)

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
        spans = len(
            image_span_starts(torch.as_tensor([prompt]), self.model.transformer.vision_config.image_start_id)
        )
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
                row, cache = self._prefill(request)
            except Exception as error:
                request.handle._publish(Event(error=_failure("preparing its prompt", error)))
                continue
            finally:
                request.images = []  # encoded now (or failed): the pictures need not stay in memory
            self._rows.append(row)
            self._set_cache(cache if self._cache is None else concat_caches([self._cache, cache]))
            self._emit_next([len(self._rows) - 1])

    def _prefill(self, request: _Request) -> tuple[_Row, KVCache]:
        """A batch-1 cache for the request (reusing a stored prefix when exact) and its first logits."""
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
            features = encode_pixels(model.transformer.visual, pixels.to(self.device))
        logits = prefill(model, [prompt[start:]], cache, features)[0]
        row = _Row(request, max_new_tokens(model, [prompt], params), logits=logits)
        if params.seed is not None:
            row.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        if params.repetition_penalty != 1.0:
            row.seen = torch.zeros(1, model.config.vocab_size, dtype=torch.bool, device=self.device)
            row.seen[0, torch.as_tensor(prompt, device=self.device)] = True
        return row, cache

    def _step(self) -> None:
        """Decode one token for every running row."""
        tokens = torch.as_tensor([row.generated[-1] for row in self._rows], device=self.device)
        try:
            logits = self._decoder()(tokens)
        except Exception:
            logger.exception("a decode step of %d rows failed; decoding them one by one", len(self._rows))
            logits = self._decode_rows_alone(tokens)
        self._steps_unchanged += 1
        for i, row in enumerate(self._rows):
            row.logits = logits[i]
        self._emit_next(range(len(self._rows)))

    def _decode_rows_alone(self, tokens: torch.Tensor) -> torch.Tensor:
        """The failed step again, a row at a time: the rows it fails for fail, the others go on
        with what the batch would have given them (a batch computes each row as it would alone)."""
        # The step may have advanced the lengths before failing. Each row holds its prompt and
        # every token it generated but the last, which this step was feeding.
        held = [len(row.request.prompt) + len(row.generated) - 1 for row in self._rows]
        self._cache.lengths.copy_(torch.as_tensor(held, device=self.device))
        survivors, caches, logits = [], [], []
        for i, row in enumerate(self._rows):
            cache = self._cache.select([i])
            try:
                logits.append(static_decode_step(self.model, tokens[i : i + 1], cache))
            except Exception as error:
                row.request.handle._publish(Event(error=_failure("decoding", error)))
                continue
            survivors.append(row)
            caches.append(cache)
        self._rows = survivors
        self._set_cache(concat_caches(caches) if caches else None)
        return torch.cat(logits) if logits else torch.empty(0)

    def _decoder(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The running batch's decode step: its runner once it is steady, else the static step
        (whose shapes stay put too, which spares the host syncs)."""
        if self.decode_mode == "plain":
            return functools.partial(decode_step, self.model, cache=self._cache)
        if self._runner is None and self._steady():
            self._runner = DecodeRunner(self.model, self._cache, self.decode_mode)
            self.steady_batches += 1
        if self._runner is not None:
            return self._runner
        return functools.partial(static_decode_step, self.model, cache=self._cache)

    def _steady(self) -> bool:
        left = min(row.max_new - len(row.generated) for row in self._rows)
        return self._steps_unchanged >= STEADY_STEPS and left >= STEADY_STEPS

    def _set_cache(self, cache: KVCache | None) -> None:
        """The running batch changed: its new cache; the old one's runner (and graph) goes."""
        self._cache, self._runner, self._steps_unchanged = cache, None, 0

    def _emit_next(self, indices: Iterable[int]) -> None:
        """Choose the next token of each row of `indices` from its logits and publish it, with its
        end if it ends."""
        rows = []
        for index in indices:
            row = self._rows[index]
            handle = row.request.handle
            if handle.cancelled.is_set() or row.max_new <= 0:
                row.finish_reason = "cancelled" if handle.cancelled.is_set() else "length"
                handle._publish(Event(finish_reason=row.finish_reason))
            else:
                rows.append(row)
        for row, token in zip(rows, choose_rows_tokens(rows), strict=True):
            if isinstance(token, RequestFailedError):
                row.finish_reason = "error"
                row.request.handle._publish(Event(error=token))
                continue
            params = row.request.params
            row.generated.append(token)
            if row.seen is not None:
                row.seen[0, token] = True
            if is_finished(token, row.generated, params):
                row.finish_reason = "stop"
            elif len(row.generated) >= row.max_new:
                row.finish_reason = "length"
            row.request.handle._publish(Event(token=token, finish_reason=row.finish_reason))

    def _retire_finished(self) -> None:
        """Drop finished rows from the batch, remembering their sequences for prefix reuse."""
        keep = [i for i, row in enumerate(self._rows) if row.finish_reason is None]
        if len(keep) == len(self._rows):
            return
        for i, row in enumerate(self._rows):
            if row.finish_reason in ("stop", "length") and row.generated:
                self._remember(i, row)
        self._rows = [self._rows[i] for i in keep]
        self._set_cache(self._cache.select(keep) if keep else None)

    def _remember(self, index: int, row: _Row) -> None:
        # the cache holds the prompt and every generated token but the last, which was never fed back
        tokens, pictures = row.request.prompt + row.generated[:-1], row.request.pictures
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
