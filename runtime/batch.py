"""Several ECSO requests decoded together: one `llama_decode` carries the next token of every active sequence.

Why: a decode step reads every weight once whatever the number of tokens in it, so N sequences stepping together
cost far less than N steps (4 sequences: 1.5-1.8x the tokens/s of one on 2 CPU cores, depending on the KV length;
much more on GPUs).

How, without writing the ECSO steps twice: every request runs the unchanged step code in its own worker thread,
against a `SequenceView`, which offers the Engine's primitives on KV sequence 1..N: a `KvSequence` (the same
object as the Engine's sequence 0) whose decoder does not call llama.cpp but hands each evaluation to the
`BatchScheduler` (runtime/scheduler.py) and waits for the step that decodes it with the others. Sequence 0 and
`Engine` itself are untouched: `run` and `parallel=1` behave exactly as before.

Sharing: a sequence whose prompt starts with the same first piece (the system prompt) as what another sequence
holds copies those cells (`llama_memory_seq_cp` of the holder's KV stream, then the rest dropped) instead of
evaluating them. The image embedding cache is the Engine's: an image is encoded once, whichever request asks first.

One KV stream per sequence (the Engine loads a parallel context with `kv_unified=False`): in a unified cache every
token attends over the cells of every sequence, which made batched steps slower than the sequential path.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional, Protocol, Sequence, Union

import numpy as np

from ecso.runtime.engine import Engine, Generation, PrefillStats, Prompt, Sampler, Sampling
from ecso.runtime.errors import EngineError, InputError
from ecso.runtime.images import ImageSource, LoadedImage
from ecso.runtime.kv import TextPiece
from ecso.runtime.prompts import Message
from ecso.runtime.scheduler import BatchScheduler, DecodeStats, ScheduledDecoder, SchedulerCancelled
from ecso.runtime.sequence import KvSequence

__all__ = ["BatchPool", "BatchScheduler", "DecodeStats", "Request", "RequestRunner", "SequenceView", "run_batched"]

if TYPE_CHECKING:
    from ecso.runtime.ecso import EcsoOptions, Result


@dataclass(frozen=True)
class Request:
    """One ECSO request for `run_many`: image (or None), query, and optionally its own options and history."""

    image: Optional[ImageSource]
    query: str
    options: Optional["EcsoOptions"] = None  # None: the caller's defaults
    history: Sequence[Message] = ()


class SequenceView:
    """The Engine's primitives as one batched request sees them: prefill / generate / logits on KV sequence `seq`
    (through the scheduler), everything else (tokenizer, chat format, image cache, config) from the Engine."""

    def __init__(self, engine: Engine, scheduler: BatchScheduler, seq: int, views: dict[int, "SequenceView"]):
        self.engine, self.seq, self.views = engine, seq, views
        self.sequence = KvSequence(seq, ScheduledDecoder(engine, scheduler), self._read_token, engine.n_ctx,
                                   engine.lock, engine.image_embeddings, self._observe, self._share_first_piece,
                                   rolls_back=engine.kv_rollback)
        self.config, self.n_ctx, self.chat_format = engine.config, engine.n_ctx, engine.chat_format

    @property
    def kv(self):
        return self.sequence.kv

    @property
    def kv_rollback(self) -> bool:
        return self.engine.kv_rollback

    @property
    def n_past(self) -> int:
        return self.sequence.n_past

    def describe(self) -> dict:
        return {**self.engine.describe(), "sequence": self.seq}

    def _read_token(self, token: int) -> Optional[bytes]:
        """A sampled token's bytes (None: it ends the generation), under the engine lock and refused once the
        engine is closed: another thread may close it between this sequence's decode steps."""
        with self.engine.lock:
            self.engine.context.check_open()
            vocab = self.engine.vocab
            return None if vocab.ends_generation(token) else vocab.token_bytes(token)

    def _observe(self, kind: str, what: object, pos0: int) -> None:
        if self.engine.observer is not None:  # the Engine's tracing hook sees every sequence's evaluations
            self.engine.observer(kind, what, pos0)

    # --- the Engine's own (shared by every sequence; each takes the engine lock) -------------------------------
    def load_image(self, src: ImageSource) -> LoadedImage:
        return self.engine.load_image(src)

    def has_encoded(self, image: LoadedImage) -> bool:
        return self.engine.has_encoded(image)

    def build_prompt(self, messages: Sequence[Message], image: Optional[LoadedImage] = None):
        return self.engine.build_prompt(messages, image)

    def check_budget(self, prompt: Prompt, max_tokens: int, what: str = "prompt") -> None:
        self.engine.check_budget(prompt, max_tokens, what)

    def clean_user_text(self, text: str) -> str:
        return self.engine.clean_user_text(text)

    def tokenize(self, text: str, add_special: bool, parse_special: bool = True) -> list[int]:
        return self.engine.tokenize(text, add_special, parse_special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.engine.detokenize(tokens)

    def single_token_ids(self, words: Sequence[str]) -> list[int]:
        return self.engine.single_token_ids(words)

    def sampler(self, sampling: Sampling) -> Sampler:
        return self.engine.sampler(sampling)

    # --- this sequence ------------------------------------------------------------------------------------------
    def cancellable(self, should_cancel: Optional[Callable[[], bool]]):
        """Checked before each evaluation of this sequence (prompt piece, image, token); no engine lock is held
        (the scheduler decodes under it)."""
        return self.sequence.cancellable(should_cancel)

    def reset(self) -> None:
        """Empties this sequence only (Engine.reset would empty every sequence)."""
        self.sequence.clear()

    def clear(self) -> None:
        self.sequence.clear()

    def rollback(self, n_pos: int) -> None:
        self.sequence.rollback(n_pos)

    def prefill(self, prompt: Prompt, reuse: bool = True, logits_all: bool = False,
                logits_out: Optional[list] = None) -> PrefillStats:
        """As Engine.prefill, on this sequence: keep the common prefix (or copy the shared system prompt from
        another sequence), evaluate the rest through the scheduler."""
        if logits_all:
            raise InputError("logits_all is not available on a batched sequence")
        return self.sequence.prefill(prompt, reuse)

    def logits(self) -> np.ndarray:
        return self.sequence.logits()

    def append_tokens(self, tokens: Sequence[int]) -> None:
        self.sequence.append_tokens(tokens)

    def sample_next(self, sampler: Sampler) -> int:
        return self.sequence.sample_next(sampler)

    def generate(self, sampling: Sampling, on_text: Optional[Callable[[str], None]] = None,
                 should_stop: Optional[Callable[[list[int]], bool]] = None,
                 first_token: Optional[int] = None, sampler: Optional[Sampler] = None) -> Generation:
        """As Engine.generate: each accepted token is one single-token job, batched with the other sequences."""
        return self.sequence.generate(self.engine.sampler, sampling, on_text, should_stop, first_token, sampler)

    def _share_first_piece(self, sequence: KvSequence, prompt: Prompt) -> int:
        """Copies the prompt's first piece (the system prompt) from a sequence that holds it; returns its size.
        Called by `KvSequence.prefill` under the engine lock, with this sequence empty."""
        first = prompt.pieces[0] if prompt.pieces else None
        if not isinstance(first, TextPiece) or first.n_pos == 0 or len(prompt.pieces) < 2:
            return 0
        holders = [(0, self.engine.kv)] + [(s, v.kv) for s, v in self.views.items() if s != self.seq]
        context = self.engine.context
        for src, kv in holders:
            if kv.pieces and kv.pieces[0] == first:
                # each sequence has its own KV stream: take the holder's whole stream, drop what follows the
                # system prompt
                context.copy_sequence(src, self.seq)
                if not context.remove(self.seq, first.n_pos):
                    sequence.clear()
                    return 0
                sequence.kv.append(first)
                return first.n_pos
        return 0


Outcome = Union["Result", BaseException]  # an EcsoError when the request failed


class RequestRunner(Protocol):
    """Runs one ECSO request on `target` (a `SequenceView` here) without taking the engine lock."""

    def __call__(self, target: Any, image: Optional[ImageSource], query: str, options: "EcsoOptions",
                 on_event: Optional[Callable], heads: Any, history: Sequence[Message]) -> "Result": ...


def run_ecso_steps(target: Any, image: Optional[ImageSource], query: str, options: "EcsoOptions",
                   on_event: Optional[Callable], heads: Any, history: Sequence[Message]) -> "Result":
    """The default runner: ECSO's four steps (`ecso.runtime.ecso.prepare_request`), imported when first used."""
    from ecso.runtime.ecso import Heads, prepare_request

    return prepare_request(target, image, query, options, on_event, heads if heads is not None else Heads(),
                           history).run()


def run_batched(engine: Engine, requests: Iterable[Request], options: "EcsoOptions", heads: Any,
                stats: Optional[DecodeStats] = None,
                runner: RequestRunner = run_ecso_steps) -> Iterator[tuple[int, Outcome]]:
    """Runs requests `engine.config.parallel` at a time through `runner`, yielding (index, Result or EcsoError)
    as each finishes.

    Each worker thread takes the next request as soon as its previous one is done (continuous batching). A
    request's EcsoError (bad image, context overflow) is its outcome; the others go on. Stopping the iteration
    cancels the requests in flight. Sequences 1..N are cleared at the end; sequence 0 is never touched."""
    sched = BatchScheduler(engine)
    todo = iter(enumerate(requests))
    take_lock = threading.Lock()
    done: queue.Queue = queue.Queue()
    views: dict[int, SequenceView] = {}

    def next_request():
        with take_lock:
            return next(todo, None)

    def worker(seq: int) -> None:
        view = views[seq]
        try:
            while True:
                item = next_request()
                if item is None:
                    return
                i, req = item
                try:
                    opts = req.options if req.options is not None else options
                    outcome = runner(view, req.image, req.query, opts, None, heads, req.history)
                except SchedulerCancelled:
                    return
                except BaseException as exc:  # the request's outcome; its sequence may hold a torn prompt
                    outcome = exc
                    view.clear()
                done.put((i, outcome))
        finally:
            sched.leave()
            done.put(None)

    n = engine.config.parallel
    threads = []
    for seq in range(1, n + 1):
        views[seq] = SequenceView(engine, sched, seq, views)
        sched.join()
    for seq in range(1, n + 1):
        t = threading.Thread(target=worker, args=(seq,), name=f"ecso-seq{seq}", daemon=True)
        threads.append(t)
        t.start()
    running = n
    try:
        while running:
            item = done.get()
            if item is None:
                running -= 1
                continue
            yield item
    finally:
        sched.cancel()
        for t in threads:
            t.join()
        sched.close()
        for view in views.values():
            view.clear()
        if stats is not None:
            stats.__dict__.update(sched.stats.__dict__)


class BatchPool:
    """Concurrent `run` calls, batched: for servers, whose request threads each call `pool.run(...)`.

    Holds N sequences; a call takes a free one (waiting while all N are busy), runs the request there with the
    other calls in flight sharing each llama_decode, and frees it. Streaming works as with `ecso.run` (on_event).
    Unlike `run_batched`, callers arrive at any time, so batch compositions depend on timing."""

    def __init__(self, engine: Engine, runner: RequestRunner = run_ecso_steps):
        self.engine, self.runner = engine, runner
        self.scheduler = BatchScheduler(engine)
        self._views: dict[int, SequenceView] = {}
        for seq in range(1, engine.config.parallel + 1):
            self._views[seq] = SequenceView(engine, self.scheduler, seq, self._views)
        self._free = list(self._views)
        self._cond = threading.Condition()
        self._closed = False

    def run(self, image: Optional[ImageSource], query: str, options: "EcsoOptions",
            on_event: Optional[Callable] = None, heads: Any = None,
            history: Sequence[Message] = (), should_cancel: Optional[Callable[[], bool]] = None) -> "Result":
        """`should_cancel`: checked before each evaluation of this request (prompt piece, image, token); True stops
        it with `Cancelled`, and its sequence is emptied and free for the next call. `heads` goes to the runner
        as given."""
        with self._cond:
            self._cond.wait_for(lambda: self._free or self._closed)
            if self._closed:
                raise EngineError("the batch pool is closed")
            # the lowest free sequence: busy sequences stay consecutive, and llama.cpp decodes consecutive
            # sequences' streams in one micro-batch (a gap splits the step in two)
            view = self._views[self._free.pop(self._free.index(min(self._free)))]
            self.scheduler.join()
        try:
            with view.cancellable(should_cancel):
                return self.runner(view, image, query, options, on_event, heads, history)
        except BaseException:
            view.clear()  # may hold a torn prompt
            raise
        finally:
            self.scheduler.leave()
            with self._cond:
                self._free.append(view.seq)
                self._cond.notify()

    def close(self) -> None:
        """Waits for the calls in flight, then stops the scheduler and empties sequences 1..N."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: len(self._free) == len(self._views))
        self.scheduler.close()
        for view in self._views.values():
            view.clear()
