"""One admitted chat completion: the worker thread that runs ECSO on it, and its events turned into a JSON reply
or an SSE stream.

A `Job` runs the request in its queue slot: on the engine itself (one slot), on a KV sequence of the server's
BatchPool (N slots), or on the remote server the gateway stands in front of. `_Exchange` reads its StepEvents and
decides which text reaches the client: in `held` mode the first answer is held back until the judge clears it.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import TYPE_CHECKING, AsyncIterator, Optional

from ecso.runtime import Result, StepEvent, run
from ecso.runtime.errors import Cancelled
from ecso.server.chat import ChatRequest, ReplyIds, api_error_from, ecso_summary, finish_reason, step_timing, usage
from ecso.server.schemas import ApiError, Delta, SlotInfo

if TYPE_CHECKING:
    from ecso.server.app import ServerState

LIVE_UNSAFE_NOTICE = "\n\n[ecso: the answer above was judged unsafe; answering again without the image]\n\n"


class ClientGone(Exception):
    pass



class End:
    """The last item of a job's event queue: the runtime finished, failed (error) or was cancelled."""

    def __init__(self, error: Optional[BaseException]):
        self.error = error


class Job:
    """One ECSO request in a worker thread, in its queue slot: on the engine itself (one slot), or on a KV sequence
    of the server's BatchPool (N slots). Its StepEvents cross to the event loop through an asyncio queue;
    `cancel()` stops it at its next decode batch or token (on a pool sequence: its next prompt piece or token).
    The slot is released only when the worker has really let go of the engine (or of its sequence)."""

    def __init__(self, state: "ServerState", req: ChatRequest, slot: int):
        self.state, self.req, self.slot = state, req, slot
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self._cancel = threading.Event()
        self.finished = asyncio.Event()
        self.max_concurrent = 0  # most requests running at once while this one ran (itself included)

    def start(self) -> None:
        jobs = self.state.jobs
        jobs.add(self)
        for job in jobs:  # on the event loop, as is _done: no lock needed
            job.max_concurrent = max(job.max_concurrent, len(jobs))
        threading.Thread(target=self._work, name=f"ecso-slot{self.slot}", daemon=True).start()

    def cancel(self) -> None:
        self._cancel.set()

    def slot_info(self) -> SlotInfo:
        return SlotInfo(index=self.slot, slots=self.state.queue.slots, max_concurrent=self.max_concurrent)

    def _work(self) -> None:
        error: Optional[BaseException] = None
        try:
            r, s = self.req, self.state
            if s.pool is None:
                run(s.engine, r.image, r.query, r.options, self._emit, s.heads, r.history,
                    should_cancel=self._cancel.is_set)
            else:
                s.pool.run(r.image, r.query, r.options, self._emit, s.heads, r.history,
                           should_cancel=self._cancel.is_set)
        except Cancelled:
            pass
        except BaseException as e:  # handed to the request's coroutine
            error = e
        try:
            self.loop.call_soon_threadsafe(self._done, error)
        except RuntimeError:  # the loop is gone (server shut down)
            pass

    def _emit(self, ev: StepEvent) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, ev)

    def _done(self, error: Optional[BaseException]) -> None:
        self.state.jobs.discard(self)
        self.state.queue.leave(self.slot)
        self.finished.set()
        self.events.put_nowait(End(error))

    async def next(self, gone: asyncio.Future) -> Optional[StepEvent | End]:
        """The next event, or None when the client went away first (the job is then cancelled)."""
        get = asyncio.ensure_future(self.events.get())
        await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
        if get.done():
            return get.result()
        get.cancel()
        self.cancel()
        return None



class Exchange:
    """One admitted chat completion: ECSO StepEvents in, a JSON reply or an SSE stream out."""

    def __init__(self, state: ServerState, job: Job, ids: ReplyIds, queue_seconds: float):
        self.state, self.job, self.ids, self.queue_seconds = state, job, ids, queue_seconds
        self.req = job.req
        self.text = _StreamText(state.config.stream_mode == "live" or not self.req.options.defense)

    async def reply(self, gone: asyncio.Future) -> dict:
        while True:
            ev = await self.job.next(gone)
            if ev is None:
                raise ClientGone()
            if isinstance(ev, End):
                raise ev.error or ApiError(500, "the ECSO request ended without a result", "engine_error")
            if ev.kind == "result":
                await self.job.finished.wait()  # the slot is free before the client can send its next request
                self.state.count("answered")
                return self.ids.completion(ev.result, self._summary(ev.result)).model_dump()

    def _summary(self, result: Result):
        return ecso_summary(result, self.queue_seconds, self.req.turns_dropped, self.job.slot_info())

    async def first_events(self, gone: asyncio.Future) -> list:
        """Events up to the first one after step 1's prefill: a request the runtime refuses at once (too long for
        the context, ...) then still gets a 4xx status instead of an error inside a 200 stream."""
        out = []
        while True:
            ev = await self.job.next(gone)
            if ev is None:
                raise ClientGone()
            if isinstance(ev, End) and ev.error is not None:
                raise ev.error
            out.append(ev)
            if isinstance(ev, End) or ev.kind != "step_start":
                return out

    async def sse(self, first: list, gone: asyncio.Future) -> AsyncIterator[dict]:
        """The SSE stream. If the client leaves (sse-starlette cancels this generator, or `gone` fires while a step
        runs silently), the job is cancelled at its next decode batch."""
        ended = False  # the stream ran to its end (else the client left: sse-starlette cancelled us, or `gone`)
        try:
            yield self._data(self.ids.chunk(Delta(role="assistant", content="")).dump())
            pending = list(first)
            while True:
                ev = pending.pop(0) if pending else await self.job.next(gone)
                if ev is None:
                    return
                if isinstance(ev, End):
                    ended = True
                    if ev.error is not None:  # headers are out: the error goes in the stream (openai raises it)
                        err = api_error_from(ev.error)
                        self.state.count("failed" if err.status >= 500 else "bad_requests")
                        yield self._data(err.body())
                    return
                if self.req.ecso_events and ev.kind != "token":
                    yield {"event": "ecso", "data": json.dumps(self._step_event(ev), ensure_ascii=False)}
                for delta in self.text.feed(ev):
                    yield self._data(self.ids.chunk(Delta(content=delta)).dump())
                if ev.kind == "result":
                    r = ev.result
                    yield self._data(self.ids.chunk(Delta(), finish_reason(r), ecso=self._summary(r)).dump())
                    if self.req.include_usage:
                        yield self._data(self.ids.chunk(None, usage=usage(r)).dump())
                    await self.job.finished.wait()  # as in reply(): the slot is free before the stream ends
                    yield {"data": "[DONE]"}
                    ended = True
                    self.state.count("answered")
                    return
        finally:
            if not ended:
                self.state.count("cancelled")
                self.job.cancel()
            gone.cancel()

    @staticmethod
    def _data(obj: dict) -> dict:
        return {"data": json.dumps(obj, ensure_ascii=False)}

    def _step_event(self, ev: StepEvent) -> dict:
        """What the page sees of a step. Never the text of the first answer (it may be the unsafe one)."""
        out: dict = {"type": ev.kind, "step": ev.step}
        if ev.kind == "step_end" and ev.trace is not None:
            out["timing"] = step_timing(ev.trace).model_dump()
            if ev.step in ("judge", "caption"):
                out["text"] = ev.text
        if ev.kind == "result":
            out.update(unsafe=ev.result.unsafe, judge_reply=ev.result.judge_reply,
                       judge_score=ev.result.judge_score, retracted=ev.result.retracted,
                       seconds=round(ev.result.seconds, 4))
        return out


class _StreamText:
    """Which text reaches a streaming client. Held: the first answer only once the judge cleared it; the
    regenerated answer as it comes. Live: everything as it comes, with a notice before a regenerated answer."""

    def __init__(self, live: bool):
        self.live = live
        self.held: list[str] = []
        self.started = False  # leading whitespace of the answer is dropped, as in non-streaming replies
        self.noticed = False

    def feed(self, ev: StepEvent) -> list[str]:
        if ev.kind == "token" and ev.step == "answer":
            if self.live:
                return self._text(ev.text)
            self.held.append(ev.text)
            return []
        if (ev.kind == "step_start" and ev.step in ("caption", "regenerate")) or ev.kind == "retract":
            self.held.clear()  # judged unsafe: the first answer is never sent
            if self.live and self.started and not self.noticed:
                self.noticed, self.started = True, False
                return [LIVE_UNSAFE_NOTICE]
            return []
        if ev.kind == "token" and ev.step == "regenerate":
            return self._text(ev.text)
        if ev.kind == "result" and not self.live and not ev.result.unsafe and ev.result.answer:
            return [ev.result.answer]
        return []

    def _text(self, delta: str) -> list[str]:
        if not self.started:
            delta = delta.lstrip()
            if not delta:
                return []
            self.started = True
        return [delta]
