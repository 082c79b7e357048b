"""The Python API for apps: load once, run many, in process or in front of an OpenAI-compatible server."""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Iterable, Iterator, Optional, Sequence, Union

from ecso.runtime.batch import Request, run_batched
from ecso.runtime.ecso import run, stream
from ecso.runtime.engine import Engine, EngineConfig
from ecso.runtime.errors import EcsoError
from ecso.runtime.images import ImageSource
from ecso.runtime.prompts import Message
from ecso.runtime.remote import RemoteConfig, RemoteModel
from ecso.runtime.results import EcsoOptions, Heads, Result, StepEvent


class Ecso:
    """Load once, run many:

        with Ecso(EngineConfig(model="llm.gguf", mmproj="mmproj.gguf")) as ecso:
            result = ecso.run("photo.png", "What should I do with this?")
            for event in ecso.stream("photo.png", "..."):
                ...

    `Ecso(RemoteConfig(url="http://127.0.0.1:8080/v1", model="NAME"))` runs the same steps against an
    OpenAI-compatible server, with the same `run` / `stream` / `run_many` and the same Result.

    Thread-safe: in process, `run` calls are serialised by the engine lock (one model, one request at a time);
    `run_many` on an engine loaded with `EngineConfig(parallel=N)` decodes N requests together. Against a server,
    `run_many` keeps `RemoteConfig.parallel` requests in flight and the server batches them.
    """

    def __init__(self, config: Union[EngineConfig, RemoteConfig], options: EcsoOptions = EcsoOptions(),
                 heads: Heads = Heads()):
        # the model requests run on: an Engine, or a RemoteModel for a server
        self.engine: Union[Engine, RemoteModel] = (RemoteModel(config) if isinstance(config, RemoteConfig)
                                                   else Engine(config))
        self.options = options
        self.heads = heads

    @property
    def is_remote(self) -> bool:
        return isinstance(self.engine, RemoteModel)

    def _opts(self, options: Optional[EcsoOptions], overrides: dict) -> EcsoOptions:
        return replace(options or self.options, **overrides)

    def run(self, image: Optional[ImageSource], query: str, options: Optional[EcsoOptions] = None,
            history: Sequence[Message] = (), **overrides) -> Result:
        return run(self.engine, image, query, self._opts(options, overrides), heads=self.heads, history=history)

    def run_many(self, requests: Iterable, options: Optional[EcsoOptions] = None, return_exceptions: bool = False,
                 **overrides) -> list:
        """Results of many requests (`batch.Request`s or (image, query) pairs), in order. With an engine loaded
        with `parallel=N` (N > 1), N requests are decoded together (runtime/batch.py); against a server,
        `parallel` requests are in flight; otherwise one after another, exactly as `run`. A failed request raises
        its EcsoError, or with return_exceptions is returned in its place."""
        reqs = [r if isinstance(r, Request) else Request(*r) for r in requests]
        opts = self._opts(options, overrides)
        out: list = [None] * len(reqs)
        if isinstance(self.engine, RemoteModel):
            outcomes: Iterable = self._remote_outcomes(reqs, opts)
        elif self.engine.config.parallel > 1:
            outcomes = run_batched(self.engine, reqs, opts, self.heads)
        else:
            outcomes = ((i, _outcome(lambda r=r: run(self.engine, r.image, r.query, r.options or opts,
                                                     heads=self.heads, history=r.history)))
                        for i, r in enumerate(reqs))
        with contextlib.closing(iter(outcomes)) as it:  # an error stops the batch now, not when collected
            for i, outcome in it:
                if isinstance(outcome, BaseException) and not (return_exceptions and isinstance(outcome, EcsoError)):
                    raise outcome
                out[i] = outcome
        return out

    def _remote_outcomes(self, reqs: list[Request], opts: EcsoOptions) -> Iterator[tuple[int, object]]:
        model = self.engine
        assert isinstance(model, RemoteModel)
        with ThreadPoolExecutor(max_workers=model.config.parallel, thread_name_prefix="ecso-remote") as pool:
            futures = [pool.submit(_outcome, lambda r=r: run(model, r.image, r.query, r.options or opts,
                                                             heads=self.heads, history=r.history))
                       for r in reqs]
            try:
                for i, future in enumerate(futures):
                    yield i, future.result()
            finally:
                for future in futures:
                    future.cancel()

    def stream(self, image: Optional[ImageSource], query: str, options: Optional[EcsoOptions] = None,
               history: Sequence[Message] = (), **overrides) -> Iterator[StepEvent]:
        return stream(self.engine, image, query, self._opts(options, overrides), heads=self.heads,
                      history=history)

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> "Ecso":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _outcome(call) -> Union[Result, EcsoError]:
    try:
        return call()
    except EcsoError as e:
        return e
