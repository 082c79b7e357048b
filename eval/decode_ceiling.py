"""llama.cpp's batched-decode ceiling: what `ecso bench --parallel N` compares its own decode speed against."""

from __future__ import annotations

import time
from typing import Sequence

from ecso.runtime.engine import Engine, Sampling
from ecso.runtime.errors import EngineError, InputError


def ceiling_decode_tok_s(engine: Engine, width: int, n_steps: int = 32, prompt_tokens: Sequence[int] = ()) -> float:
    """The llama.cpp ceiling for `width` sequences: the same batched single-token decode with no ECSO logic
    (greedy sampling straight from each batch row, nothing else), each sequence after its own copy of a text prompt
    (its own cells, as ECSO requests have). Uses and clears sequences 1..width."""
    if not 1 <= width <= engine.config.parallel:
        raise InputError(f"width must be between 1 and the engine's parallel ({engine.config.parallel})")
    tokens = list(prompt_tokens) or engine.tokenize("Write a long story about a lighthouse keeper.", True)
    if len(tokens) + n_steps > engine.n_ctx:
        raise InputError("the ceiling prompt and steps do not fit in the context")

    with engine.lock:
        engine.context.check_open()
        ctx = engine.context

        def decode(rows: list[tuple[int, int, int, bool]]) -> None:
            if ctx.decode_rows(rows) != 0:
                raise EngineError("the ceiling decode failed")

        with ctx.sampler(Sampling()) as greedy:
            nxt = []
            for s in range(1, width + 1):
                ctx.remove(s)
                for c in range(0, len(tokens), ctx.n_batch):
                    part = tokens[c:c + ctx.n_batch]
                    decode([(t, c + i, s, c + i == len(tokens) - 1) for i, t in enumerate(part)])
                nxt.append(ctx.sample(greedy, -1))
            pos = len(tokens)
            t0 = time.perf_counter()
            for _ in range(n_steps):
                decode([(nxt[k], pos, k + 1, True) for k in range(width)])
                nxt = [ctx.sample(greedy, k) for k in range(width)]
                pos += 1
            seconds = time.perf_counter() - t0
            for s in range(1, width + 1):
                ctx.remove(s)
    return width * n_steps / seconds
