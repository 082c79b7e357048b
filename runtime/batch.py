"""Several ECSO requests decoded together: one `llama_decode` carries the next token of every active sequence.

Why: a decode step reads every weight once whatever the number of tokens in it, so N sequences stepping together
cost far less than N steps (4 sequences: 1.5-1.8x the tokens/s of one on 2 CPU cores, depending on the KV length;
much more on GPUs).

How, without writing the ECSO steps twice: every request runs the unchanged step code (`ecso._Request`) in its own
worker thread, against a `SequenceView`, which looks like the Engine but owns KV sequence 1..N and its own
`PrefixCache`. The view's prefill / generate do not call llama.cpp: they hand each evaluation to the
`BatchScheduler` and wait. The scheduler waits until every active worker has an evaluation pending (so the batch
composition, and with it the arithmetic, does not depend on thread timing), then packs all of them into one
`llama_decode`: single-token decodes first, prefill text after them up to the batch size (a long prefill continues
in the next steps, so it never holds the others back for more than one step), and at most one image prefill
(mtmd decodes image embeddings in their own batches). Sequence 0 and `Engine` itself are untouched: `run` and
`parallel=1` behave exactly as before.

Sharing: a sequence whose prompt starts with the same first piece (the system prompt) as what another sequence
holds copies those cells (`llama_memory_seq_cp` of the holder's KV stream, then the rest dropped) instead of
evaluating them. The image embedding cache is the Engine's: an image is encoded once, whichever request asks first.

One KV stream per sequence (the Engine loads a parallel context with `kv_unified=False`): in a unified cache every
token attends over the cells of every sequence, which made batched steps slower than the sequential path.
"""

from __future__ import annotations

import ctypes
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from ecso.runtime.engine import Engine, Generation, PrefillStats, Prompt, Sampler, Sampling, generate_tokens
from ecso.runtime.errors import Cancelled, ContextOverflowError, EcsoError, EngineError, InputError
from ecso.runtime.images import CachedEmbedding, ImageSource
from ecso.runtime.kv import PrefixCache, TextPiece, suffix_after
from ecso.runtime.media import ImageChunk
from ecso.runtime.prompts import Message

if TYPE_CHECKING:
    from ecso.runtime.ecso import EcsoOptions, Heads, Result


@dataclass(frozen=True)
class Request:
    """One ECSO request for `run_many`: image (or None), query, and optionally its own options and history."""

    image: Optional[ImageSource]
    query: str
    options: Optional["EcsoOptions"] = None  # None: the caller's defaults
    history: Sequence[Message] = ()


@dataclass
class _Job:
    """One evaluation a worker waits for: text tokens, or an image's embeddings, at positions pos0.. of seq."""

    seq: int
    pos0: int
    tokens: Sequence[int] = ()
    image: Optional[tuple[CachedEmbedding, np.ndarray]] = None
    done: int = 0  # tokens evaluated so far (a long prefill spans several steps)
    logits: Optional[np.ndarray] = None  # next-token logits after the last position (text jobs)
    error: Optional[BaseException] = None
    finished: threading.Event = field(default_factory=threading.Event)


@dataclass
class DecodeStats:
    """What the scheduler did: steps, tokens per step, and the wall time of pure decode steps by batch width."""

    steps: int = 0
    text_tokens: int = 0
    image_decodes: int = 0
    # width k -> [steps, seconds]: steps that carried exactly one new token for each of k sequences and nothing
    # else, timed from the end of the previous step (so worker-side sampling and bookkeeping are included)
    pure: dict[int, list[float]] = field(default_factory=dict)

    def decode_tok_s(self, width: int) -> Optional[float]:
        steps, seconds = self.pure.get(width, (0, 0.0))
        return width * steps / seconds if steps and seconds > 0 else None


class _Cancelled(Exception):
    """run_many's consumer went away: in-flight requests stop at their next evaluation."""


class BatchScheduler:
    """Gathers the pending evaluations of all active workers into one llama_decode per step (module docstring)."""

    def __init__(self, engine: Engine):
        if engine.config.parallel < 2:
            raise InputError("batched decoding needs an engine loaded with parallel >= 2 (EngineConfig.parallel)")
        self.engine = engine
        self.stats = DecodeStats()
        self._cond = threading.Condition()
        self._pending: list[_Job] = []
        self._active = 0
        self._stop = False
        self._cancelled = False
        self._last_step_end = time.perf_counter()
        L = engine._L
        self._batch = L.llama_batch_init(engine.n_batch, 0, 1)
        self._thread = threading.Thread(target=self._loop, name="ecso-batch", daemon=True)
        self._thread.start()

    # --- workers ------------------------------------------------------------------------------------------------
    def join(self) -> None:
        with self._cond:
            self._active += 1

    def leave(self) -> None:
        with self._cond:
            self._active -= 1
            self._cond.notify_all()

    def evaluate(self, job: _Job) -> _Job:
        """Queues the job for the next step(s) and waits until it is done; raises its error."""
        with self._cond:
            if self._cancelled:
                raise _Cancelled()
            self._pending.append(job)
            self._cond.notify_all()
        job.finished.wait()
        if job.error is not None:
            raise job.error
        return job

    def cancel(self) -> None:
        with self._cond:
            self._cancelled = True
            for job in self._pending:
                job.error = _Cancelled()
                job.finished.set()
            self._pending.clear()
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join()
        if self._batch is not None:
            self.engine._L.llama_batch_free(self._batch)
            self._batch = None

    # --- the step loop ------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stop or (self._pending and len(self._pending) >= self._active))
                if self._stop:
                    return
                jobs = list(self._pending)
            try:
                with self.engine.lock:
                    self.engine._check_open()
                    finished = self._step(jobs)
            except BaseException as e:  # a failed decode fails every job of the step; their workers clean up
                finished = jobs
                for job in jobs:
                    job.error = e if isinstance(e, EcsoError) else EngineError(f"batched decode failed: {e}")
            with self._cond:
                for job in finished:
                    if job in self._pending:
                        self._pending.remove(job)
            for job in finished:
                job.finished.set()

    def _step(self, jobs: list[_Job]) -> list[_Job]:
        """One llama_decode over the text jobs (decodes first, prefill chunks up to the batch size), then at most
        one image prefill. Returns the jobs that are complete."""
        L, e, b = self.engine._L, self.engine, self._batch
        # Budget: single-token decodes first, then prefill chunks up to the batch size (a fixed order, not the order
        # the threads happened to submit in). Layout: by sequence id, because llama.cpp splits a batch over several
        # KV streams into micro-batches of consecutive sequences (llama_batch_allocr::split_equal).
        text = sorted((j for j in jobs if j.image is None), key=lambda j: (len(j.tokens) - j.done, j.seq))
        images = sorted((j for j in jobs if j.image is not None), key=lambda j: j.seq)
        finished: list[_Job] = []
        takes: list[tuple[_Job, int]] = []
        budget = e.n_batch
        for job in text:
            take = min(len(job.tokens) - job.done, budget)
            if take <= 0:
                break
            takes.append((job, take))
            budget -= take
        n = 0
        rows: list[tuple[_Job, int]] = []
        for job, take in sorted(takes, key=lambda jt: jt[0].seq):
            for i in range(take):
                k = job.done + i
                b.token[n] = job.tokens[k]
                b.pos[n] = job.pos0 + k
                b.n_seq_id[n] = 1
                b.seq_id[n][0] = job.seq
                b.logits[n] = k == len(job.tokens) - 1
                n += 1
            job.done += take
            if job.done == len(job.tokens):
                rows.append((job, n - 1))
        if n:
            b.n_tokens = n
            rc = L.llama_decode(e._ctx, b)
            if rc != 0:
                raise (ContextOverflowError("the KV cache is full; use a larger --ctx or fewer --max-tokens")
                       if rc == 1 else EngineError(f"llama_decode failed with code {rc}"))
            for job, row in rows:
                ptr = L.llama_get_logits_ith(e._ctx, row)
                job.logits = np.ctypeslib.as_array(ptr, shape=(e.n_vocab,)).copy()
                finished.append(job)
        if images:
            job = images[0]
            self._decode_image(job)
            finished.append(job)
        self._record(jobs, n, bool(images))
        return finished

    def _decode_image(self, job: _Job) -> None:
        """The image block on the job's sequence, as Engine._decode_image does on sequence 0: the family's marker
        tokens as text, each image chunk from its embeddings (mtmd sets the positions)."""
        e, L, M = self.engine, self.engine._L, self.engine._M
        entry, embd = job.image
        pos = job.pos0
        arrays = iter(embd)
        for part in entry.chunk.parts:
            if not isinstance(part, ImageChunk):
                self._decode_text(part, pos, job.seq)
                pos += len(part)
                continue
            new_n_past = L.llama_pos(0)
            ptr = next(arrays).ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            rc = M.mtmd_helper_decode_image_chunk(e._mctx, e._ctx, part.ptr, ptr, pos, job.seq, e.n_batch,
                                                  ctypes.byref(new_n_past), M.mtmd_helper_post_decode_callback(),
                                                  None)
            if rc != 0:
                raise EngineError(f"the image decode failed (code {rc})")
            if new_n_past.value != pos + part.n_pos:
                raise EngineError(f"image decode advanced to {new_n_past.value}, expected {pos + part.n_pos}")
            pos += part.n_pos
        if pos != job.pos0 + entry.n_pos:
            raise EngineError(f"image block took {pos - job.pos0} positions, expected {entry.n_pos}")

    def _decode_text(self, tokens: Sequence[int], pos0: int, seq: int) -> None:
        """An image block's marker tokens on one sequence (no logits needed: the block is never a prompt's end)."""
        L, e, b = self.engine._L, self.engine, self._batch
        for start in range(0, len(tokens), e.n_batch):
            part = tokens[start:start + e.n_batch]
            for i, tok in enumerate(part):
                b.token[i], b.pos[i], b.n_seq_id[i] = tok, pos0 + start + i, 1
                b.seq_id[i][0] = seq
                b.logits[i] = False
            b.n_tokens = len(part)
            rc = L.llama_decode(e._ctx, b)
            if rc != 0:
                raise (ContextOverflowError("the KV cache is full; use a larger --ctx or fewer --max-tokens")
                       if rc == 1 else EngineError(f"llama_decode failed with code {rc}"))

    def _record(self, jobs: list[_Job], n_tokens: int, image: bool) -> None:
        now = time.perf_counter()
        s = self.stats
        s.steps += 1
        s.text_tokens += n_tokens
        s.image_decodes += int(image)
        if not image and n_tokens and all(len(j.tokens) == 1 for j in jobs) and n_tokens == len(jobs):
            slot = s.pure.setdefault(n_tokens, [0, 0.0])
            slot[0] += 1
            slot[1] += now - self._last_step_end
        self._last_step_end = now


def _sample(engine: Engine, chain, logits: np.ndarray) -> int:
    """llama_sampler_sample on a copied logits row: the same candidates, the same chain, accepted afterwards."""
    L = engine._L
    cand = np.empty(engine.n_vocab, dtype=[("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
    cand["id"] = np.arange(engine.n_vocab, dtype=np.int32)
    cand["logit"] = logits
    cand["p"] = 0.0
    arr = L.llama_token_data_array(cand.ctypes.data_as(ctypes.POINTER(L.llama_token_data)), engine.n_vocab, -1, False)
    L.llama_sampler_apply(chain, ctypes.byref(arr))
    if not 0 <= arr.selected < arr.size:
        raise EngineError("the sampler selected no token")
    tok = int(arr.data[arr.selected].id)
    L.llama_sampler_accept(chain, tok)
    return tok


class SequenceView:
    """The Engine as one request sees it: prefill / generate / logits on KV sequence `seq`, through the scheduler.
    Everything else (tokenizer, chat format, image cache, config) is the Engine's."""

    def __init__(self, engine: Engine, scheduler: BatchScheduler, seq: int, views: dict[int, "SequenceView"]):
        self._engine, self._sched, self.seq, self._views = engine, scheduler, seq, views
        self.kv = PrefixCache()
        self._logits: Optional[np.ndarray] = None
        # BatchPool.run's caller may stop its request: checked before each evaluation (prompt piece, image, token)
        self.should_cancel: Optional[Callable[[], bool]] = None

    def __getattr__(self, name):  # the Engine's read-only parts: tokenize, chat_format, n_ctx, config, ...
        return getattr(self._engine, name)

    def describe(self) -> dict:
        return {**self._engine.describe(), "sequence": self.seq}

    def build_prompt(self, messages, image=None):
        with self._engine.lock:  # the image cache and the mtmd preprocessor are shared
            self._engine._check_open()
            return self._engine.build_prompt(messages, image)

    # --- KV bookkeeping (under the engine lock: the scheduler decodes under it) --------------------------------
    def reset(self) -> None:
        """Empties this sequence only (Engine.reset would empty every sequence)."""
        self.clear()

    def clear(self) -> None:
        with self._engine.lock:
            if self._engine._ctx:  # a closed engine holds no cells
                self._engine._L.llama_memory_seq_rm(self._engine._mem, self.seq, -1, -1)
            self.kv.clear()
            self._logits = None

    def rollback(self, n_pos: int) -> None:
        with self._engine.lock:
            self._engine._check_open()
            self.kv.truncate(n_pos)
            if not self._engine._L.llama_memory_seq_rm(self._engine._mem, self.seq, n_pos, -1):
                self.clear()
                raise EngineError("llama.cpp could not roll back the KV cache; the sequence was cleared")

    def _share_first_piece(self, prompt: Prompt) -> int:
        """Copies the prompt's first piece (the system prompt) from a sequence that holds it; returns its size."""
        e = self._engine
        first = prompt.pieces[0] if prompt.pieces else None
        if not isinstance(first, TextPiece) or first.n_pos == 0 or len(prompt.pieces) < 2:
            return 0
        holders = [(0, e.kv)] + [(s, v.kv) for s, v in self._views.items() if s != self.seq]
        for src, kv in holders:
            if kv.pieces and kv.pieces[0] == first:
                # each sequence has its own KV stream (Engine._load): llama.cpp copies whole streams only (a partial
                # cross-stream copy aborts, llamacpp-notes P14), so take the holder's stream and drop what follows
                # the system prompt. This sequence is empty here (prefill rolled it back to 0).
                e._L.llama_memory_seq_cp(e._mem, src, self.seq, -1, -1)
                if not e._L.llama_memory_seq_rm(e._mem, self.seq, first.n_pos, -1):
                    self.clear()
                    return 0
                self.kv.append(first)
                return first.n_pos
        return 0

    # --- the Engine primitives the ECSO steps use ---------------------------------------------------------------
    def prefill(self, prompt: Prompt, reuse: bool = True, logits_all: bool = False,
                logits_out: Optional[list] = None) -> PrefillStats:
        """As Engine.prefill, on this sequence: keep the common prefix (or copy the shared system prompt from
        another sequence), evaluate the rest through the scheduler."""
        if logits_all:
            raise InputError("logits_all is not available on a batched sequence")
        e = self._engine
        t0 = time.perf_counter()
        with e.lock:
            if reuse:
                keep = self.kv.reusable_prefix(prompt.pieces)
                if not e.kv_rollback and keep < self.kv.n_pos:
                    keep = 0  # a recurrent state cannot be cut back (Engine.kv_rollback): recompute
                self.rollback(keep)
                if keep == 0 and e.kv_rollback:
                    keep = self._share_first_piece(prompt)
            else:
                self.clear()
                keep = 0
        encodes, t_enc = 0, 0.0
        pos = keep
        for piece in suffix_after(prompt.pieces, keep):
            if isinstance(piece, TextPiece):
                self._evaluate(_Job(self.seq, pos, tokens=piece.tokens))
            else:
                entry = prompt.images[piece.key]
                with e.lock:  # the image cache and the vision encoder are shared with the other sequences
                    e._check_open()
                    embd, seconds = e._image_embeddings(entry, reuse)
                encodes, t_enc = encodes + (seconds is not None), t_enc + (seconds or 0.0)
                if e.observer is not None:
                    e.observer("image", entry.n_pos, pos)
                self._check_cancel()
                self._sched.evaluate(_Job(self.seq, pos, image=(entry, embd)))
                self._logits = None
            with e.lock:
                self.kv.append(piece)
            pos += piece.n_pos
        return PrefillStats(prompt.n_pos, keep, prompt.n_pos - keep, encodes, time.perf_counter() - t0, t_enc)

    def _check_cancel(self) -> None:
        if self.should_cancel is not None and self.should_cancel():
            raise Cancelled("the request was cancelled")

    def _evaluate(self, job: _Job) -> None:
        if self._engine.observer is not None:
            self._engine.observer("text", tuple(job.tokens), job.pos0)
        self._check_cancel()
        self._logits = self._sched.evaluate(job).logits

    @property
    def n_past(self) -> int:
        return self.kv.n_pos

    def logits(self) -> np.ndarray:
        if self._logits is None:
            raise EngineError("no logits: evaluate text on this sequence first")
        return self._logits.copy()

    def append_tokens(self, tokens: Sequence[int]) -> None:
        self._evaluate(_Job(self.seq, self.kv.n_pos, tokens=tuple(tokens)))
        with self._engine.lock:
            self.kv.append(TextPiece(tuple(tokens)))

    def sampler(self, sampling: Sampling) -> Sampler:
        return Sampler(self._engine._L, sampling)

    def sample_next(self, sampler: Sampler) -> int:
        return _sample(self._engine, sampler.ptr, self.logits())

    def generate(self, sampling: Sampling, on_text: Optional[Callable[[str], None]] = None,
                 should_stop: Optional[Callable[[list[int]], bool]] = None,
                 first_token: Optional[int] = None, sampler: Optional[Sampler] = None) -> Generation:
        """As Engine.generate: each accepted token is one single-token job, batched with the other sequences."""
        e = self._engine
        return generate_tokens(e, sampling, lambda chain: _sample(e, chain, self.logits()),
                               lambda tok: self.append_tokens((tok,)), lambda: self.kv.n_pos, on_text, should_stop,
                               first_token, sampler)


Outcome = Union["Result", BaseException]  # an EcsoError when the request failed


def run_batched(engine: Engine, requests: Iterable[Request], options: "EcsoOptions", heads: Optional["Heads"],
                stats: Optional[DecodeStats] = None) -> Iterator[tuple[int, Outcome]]:
    """Runs requests `engine.config.parallel` at a time, yielding (index, Result or EcsoError) as each finishes.

    Each worker thread takes the next request as soon as its previous one is done (continuous batching). A
    request's EcsoError (bad image, context overflow) is its outcome; the others go on. Stopping the iteration
    cancels the requests in flight. Sequences 1..N are cleared at the end; sequence 0 is never touched."""
    from ecso.runtime.ecso import Heads, prepare_request

    heads = heads if heads is not None else Heads()
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
                    outcome = prepare_request(view, req.image, req.query, opts, None, heads, req.history).run()
                except _Cancelled:
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

    def __init__(self, engine: Engine):
        self.engine = engine
        self.scheduler = BatchScheduler(engine)
        self._views: dict[int, SequenceView] = {}
        for seq in range(1, engine.config.parallel + 1):
            self._views[seq] = SequenceView(engine, self.scheduler, seq, self._views)
        self._free = list(self._views)
        self._cond = threading.Condition()
        self._closed = False

    def run(self, image: Optional[ImageSource], query: str, options: "EcsoOptions",
            on_event: Optional[Callable] = None, heads: Optional["Heads"] = None,
            history: Sequence[Message] = (), should_cancel: Optional[Callable[[], bool]] = None) -> "Result":
        """`should_cancel`: checked before each evaluation of this request (prompt piece, image, token); True stops
        it with `Cancelled`, and its sequence is emptied and free for the next call."""
        from ecso.runtime.ecso import Heads, prepare_request

        with self._cond:
            self._cond.wait_for(lambda: self._free or self._closed)
            if self._closed:
                raise EngineError("the batch pool is closed")
            # the lowest free sequence: busy sequences stay consecutive, and llama.cpp decodes consecutive
            # sequences' streams in one micro-batch (a gap splits the step in two)
            view = self._views[self._free.pop(self._free.index(min(self._free)))]
            self.scheduler.join()
        view.should_cancel = should_cancel
        try:
            return prepare_request(view, image, query, options, on_event, heads or Heads(), history).run()
        except BaseException:
            view.clear()  # may hold a torn prompt
            raise
        finally:
            view.should_cancel = None
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


def ceiling_decode_tok_s(engine: Engine, width: int, n_steps: int = 32, prompt_tokens: Sequence[int] = ()) -> float:
    """The llama.cpp ceiling for `width` sequences: the same batched single-token decode with no ECSO logic
    (greedy via llama_sampler_sample, nothing else), each sequence after its own copy of a text prompt (its own
    cells, as ECSO requests have). Uses and clears sequences 1..width."""
    if not 1 <= width <= engine.config.parallel:
        raise InputError(f"width must be between 1 and the engine's parallel ({engine.config.parallel})")
    L = engine._L
    tokens = list(prompt_tokens) or engine.tokenize("Write a long story about a lighthouse keeper.", True)
    if len(tokens) + n_steps > engine.n_ctx:
        raise InputError("the ceiling prompt and steps do not fit in the context")
    batch = L.llama_batch_init(engine.n_batch, 0, 1)
    greedy = L.llama_sampler_init_greedy()

    def decode(rows: list[tuple[int, int, int, bool]]) -> None:
        for k, (tok, pos, seq, want) in enumerate(rows):
            batch.token[k], batch.pos[k], batch.n_seq_id[k] = tok, pos, 1
            batch.seq_id[k][0] = seq
            batch.logits[k] = want
        batch.n_tokens = len(rows)
        if L.llama_decode(engine._ctx, batch) != 0:
            raise EngineError("the ceiling decode failed")

    try:
        with engine.lock:
            engine._check_open()
            nxt = []
            for s in range(1, width + 1):
                L.llama_memory_seq_rm(engine._mem, s, -1, -1)
                for c in range(0, len(tokens), engine.n_batch):
                    part = tokens[c:c + engine.n_batch]
                    decode([(t, c + i, s, c + i == len(tokens) - 1) for i, t in enumerate(part)])
                nxt.append(L.llama_sampler_sample(greedy, engine._ctx, -1))
            pos = len(tokens)
            t0 = time.perf_counter()
            for _ in range(n_steps):
                decode([(nxt[k], pos, k + 1, True) for k in range(width)])
                nxt = [L.llama_sampler_sample(greedy, engine._ctx, k) for k in range(width)]
                pos += 1
            seconds = time.perf_counter() - t0
            for s in range(1, width + 1):
                L.llama_memory_seq_rm(engine._mem, s, -1, -1)
        return width * n_steps / seconds
    finally:
        L.llama_sampler_free(greedy)
        L.llama_batch_free(batch)
