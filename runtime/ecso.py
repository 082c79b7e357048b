"""Running ECSO's four steps (runtime/steps.py) for one request, in process or against a remote server.

`run` / `stream` take the model a request runs on: an Engine (or a batched sequence of one, runtime/batch.py) or a
`RemoteModel` (an OpenAI-compatible server, runtime/remote.py). `prepare_request` checks the inputs and picks the
backend; the steps themselves never know which one they talk to.

The names other code imports from here (EcsoOptions, Result, StepEvent, ...) are re-exported; the `Ecso` API class
lives in runtime/api.py, which uses this module (and runtime/batch.py) and is used by neither.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable, Iterator, Optional, Sequence

from ecso.runtime.errors import Cancelled, InputError
from ecso.runtime.images import ImageSource
from ecso.runtime.judges import JUDGES as JUDGE_TABLE
from ecso.runtime.local_backend import LocalBackend, StepPrompts, p_yes, yes_no_ids
from ecso.runtime.prompts import JUDGE_NAMES, Message
from ecso.runtime.remote import RemoteBackend, RemoteModel
from ecso.runtime.results import (CaptionHead, EcsoOptions, Heads, JudgeHead, Result, StepEvent, StepSeed,
                                  StepTrace)
from ecso.runtime.steps import EcsoRequest

JUDGES = JUDGE_NAMES  # the judge names (each one's behaviour: runtime/judges.py JUDGES)

__all__ = ["EcsoOptions", "Heads", "JudgeHead", "CaptionHead", "Result", "StepEvent", "StepTrace", "StepSeed",
           "JUDGES", "JUDGE_TABLE", "StepPrompts", "yes_no_ids", "p_yes", "run", "stream", "prepare_request"]

# what a request runs on: an Engine, a batched sequence with the Engine's primitives, or a RemoteModel
Target = Any


def run(target: Target, image: Optional[ImageSource], query: str, options: EcsoOptions = EcsoOptions(),
        on_event: Optional[Callable[[StepEvent], None]] = None, heads: Heads = Heads(),
        history: Sequence[Message] = (), should_cancel: Optional[Callable[[], bool]] = None) -> Result:
    """Runs ECSO for one request; `on_event` receives StepEvents as they happen (used by `stream`).
    `should_cancel`: checked between decode batches, tokens and steps (remote: between steps); True stops the
    request with `Cancelled`.

    `history`: earlier turns of a conversation (system / user / assistant), sent before `query` in step 1 and to
    the appended judges; the image goes first in the first user turn (LLaVA style). The paper's TELL / CAP / GEN
    prompts stay single-turn."""
    if isinstance(target, RemoteModel):  # no engine lock: the server schedules concurrent requests itself
        return prepare_request(target, image, query, options, on_event, heads, history,
                               should_cancel=should_cancel).run()
    with target.cancellable(should_cancel):  # holds the engine lock for the whole request
        return prepare_request(target, image, query, options, on_event, heads, history).run()


def prepare_request(target: Target, image: Optional[ImageSource], query: str, options: EcsoOptions,
                    on_event: Optional[Callable[[StepEvent], None]], heads: Heads,
                    history: Sequence[Message], should_cancel: Optional[Callable[[], bool]] = None) -> EcsoRequest:
    """Checks the inputs and loads the image: a request ready to `run()` on `target` (an Engine, a batched
    sequence that behaves like one, or a RemoteModel)."""
    options.validate()
    if options.system_prompt is not None and any(m.role == "system" for m in history):
        raise InputError("give the system prompt once: EcsoOptions.system_prompt or a system message in the history")
    emit = on_event or (lambda event: None)
    if not isinstance(query, str) or not query.strip():
        raise InputError("the query is empty; give a question about the image")
    if len(query) > target.config.max_query_chars:
        raise InputError(f"the query has {len(query)} characters, over the limit of {target.config.max_query_chars}")
    started_at = time.perf_counter()
    if isinstance(target, RemoteModel):
        backend: Any = RemoteBackend(target, image, query, history, options, heads, should_cancel)
    else:
        loaded = target.load_image(image) if image is not None else None
        backend = LocalBackend(target, loaded, query, history, options)
    return EcsoRequest(backend, options, emit, heads, started_at)


def stream(target: Target, image: Optional[ImageSource], query: str,
           options: EcsoOptions = EcsoOptions(), heads: Heads = Heads(),
           history: Sequence[Message] = ()) -> Iterator[StepEvent]:
    """Yields StepEvents (answer tokens as they are generated) and finally a `result` event.
    The request runs in a worker thread (holding the engine lock in process); if the consumer stops iterating
    (or closes the generator), the worker is cancelled at its next decode batch or token (remote: at its next
    step) and the lock is released."""
    events: queue.Queue = queue.Queue()
    stop = threading.Event()
    error: list[BaseException] = []

    def on_event(event: StepEvent) -> None:
        if stop.is_set():
            raise _ConsumerGone()
        events.put(event)

    def work() -> None:
        try:
            run(target, image, query, options, on_event, heads, history, should_cancel=stop.is_set)
        except (_ConsumerGone, Cancelled):
            pass
        except BaseException as e:  # re-raised in the consumer
            error.append(e)
        finally:
            events.put(None)

    worker = threading.Thread(target=work, name="ecso-stream", daemon=True)
    worker.start()
    try:
        while True:
            event = events.get()
            if event is None:
                break
            yield event
    finally:
        stop.set()
        worker.join()
    if error:
        raise error[0]


class _ConsumerGone(Exception):
    """The stream's consumer went away."""
