"""The batch scheduler: one `llama_decode` carries the pending evaluation of every active KV sequence.

Each batched sequence (`ScheduledDecoder`) hands its evaluations to the `BatchScheduler` as jobs and waits. The
scheduler waits until every active worker has an evaluation pending (so the batch composition, and with it the
arithmetic, does not depend on thread timing), then packs all of them into one `llama_decode`: single-token
decodes first, prefill text after them up to the batch size (a long prefill continues in the next steps, so it
never holds the others back for more than one step), and at most one image prefill (mtmd decodes image embeddings
in their own batches).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from ecso.runtime.engine import Engine, Sampler
from ecso.runtime.errors import EcsoError, EngineError, InputError
from ecso.runtime.images import CachedEmbedding
from ecso.runtime.llama_context import decode_error


@dataclass
class Job:
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


class SchedulerCancelled(Exception):
    """The batch was cancelled (run_many's consumer went away): in-flight requests stop at their next evaluation."""


class BatchScheduler:
    """Gathers the pending evaluations of all active workers into one llama_decode per step (module docstring)."""

    def __init__(self, engine: Engine):
        if engine.config.parallel < 2:
            raise InputError("batched decoding needs an engine loaded with parallel >= 2 (EngineConfig.parallel)")
        self.engine = engine
        self.stats = DecodeStats()
        self._cond = threading.Condition()
        self._pending: list[Job] = []
        self._active = 0
        self._stop = False
        self._cancelled = False
        self._last_step_end = time.perf_counter()
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

    def evaluate(self, job: Job) -> Job:
        """Queues the job for the next step(s) and waits until it is done; raises its error."""
        with self._cond:
            if self._cancelled:
                raise SchedulerCancelled()
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
                job.error = SchedulerCancelled()
                job.finished.set()
            self._pending.clear()
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join()

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
                    self.engine.context.check_open()
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

    def _step(self, jobs: list[Job]) -> list[Job]:
        """One llama_decode over the text jobs (decodes first, prefill chunks up to the batch size), then at most
        one image prefill. Returns the jobs that are complete."""
        ctx = self.engine.context
        # Budget: single-token decodes first, then prefill chunks up to the batch size (a fixed order, not the order
        # the threads happened to submit in). Layout: by sequence id, because llama.cpp splits a batch over several
        # KV streams into micro-batches of consecutive sequences (llama_batch_allocr::split_equal).
        text = sorted((j for j in jobs if j.image is None), key=lambda j: (len(j.tokens) - j.done, j.seq))
        images = sorted((j for j in jobs if j.image is not None), key=lambda j: j.seq)
        finished: list[Job] = []
        takes: list[tuple[Job, int]] = []
        budget = ctx.n_batch
        for job in text:
            take = min(len(job.tokens) - job.done, budget)
            if take <= 0:
                break
            takes.append((job, take))
            budget -= take
        batch: list[tuple[int, int, int, bool]] = []
        rows: list[tuple[Job, int]] = []
        for job, take in sorted(takes, key=lambda jt: jt[0].seq):
            for i in range(take):
                k = job.done + i
                batch.append((job.tokens[k], job.pos0 + k, job.seq, k == len(job.tokens) - 1))
            job.done += take
            if job.done == len(job.tokens):
                rows.append((job, len(batch) - 1))
        if batch:
            rc = ctx.decode_rows(batch)
            if rc != 0:
                raise decode_error(rc, cleared=False)
            for job, row in rows:
                job.logits = ctx.row_logits(row)
                finished.append(job)
        if images:
            job = images[0]
            entry, embd = job.image
            # the family's marker tokens go in their own batches (never a prompt's end: no logits needed)
            rc = ctx.decode_image(job.seq, entry, embd, job.pos0)
            if rc != 0:
                raise decode_error(rc, cleared=False)
            finished.append(job)
        self._record(jobs, len(batch), bool(images))
        return finished

    def _record(self, jobs: list[Job], n_tokens: int, image: bool) -> None:
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


class ScheduledDecoder:
    """A batched sequence's decoder: each evaluation is a job for the scheduler, decoded with the other sequences'
    pending evaluations in one llama_decode; the logits row of its last token is copied back."""

    def __init__(self, engine: Engine, scheduler: BatchScheduler):
        self.engine, self.scheduler = engine, scheduler
        self.last_logits: Optional[np.ndarray] = None

    def decode_text(self, seq: int, tokens: Sequence[int], pos0: int, check: Callable[[], None],
                    logits_all: bool = False, logits_out: Optional[list] = None) -> None:
        if logits_all:
            raise InputError("logits_all is not available on a batched sequence")
        check()
        self.last_logits = self.scheduler.evaluate(Job(seq, pos0, tokens=tuple(tokens))).logits

    def decode_image(self, seq: int, entry: CachedEmbedding, embd: list[np.ndarray], pos0: int,
                     check: Callable[[], None]) -> None:
        check()
        self.scheduler.evaluate(Job(seq, pos0, image=(entry, embd)))
        self.last_logits = None

    def logits(self, seq: int) -> np.ndarray:
        if self.last_logits is None:
            raise EngineError("no logits: evaluate text on this sequence first")
        return self.last_logits.copy()

    def sample(self, chain: Sampler, seq: int) -> int:
        return self.engine.context.sample_logits(chain, self.logits(seq))

    def remove(self, seq: int, from_pos: int) -> bool:
        with self.engine.lock:
            self.engine.context.check_open()
            return self.engine.context.remove(seq, from_pos)

    def clear(self, seq: int) -> None:
        with self.engine.lock:
            if self.engine.context.is_open:  # a closed engine holds no cells
                self.engine.context.remove(seq)
            self.last_logits = None
