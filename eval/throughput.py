"""`ecso bench --parallel N`: eval throughput with N requests decoded together, against one at a time.

The sequential side runs on an ordinary engine (`parallel=1`, today's path), the parallel side on one loaded with
`parallel=N` (the same model files and settings), on the same requests (different queries, each with its own
image: `distinct_image`), greedy, each side starting cold (KV and embedding caches empty). The baseline is what a
user runs without --parallel.
- requests per minute, parallel vs sequential, on the full 4-step path (logit judge at threshold 0: every answer
  is judged unsafe) and on the safe path (threshold above 1: none is);
- aggregate decode tokens/s in the steps where all N sequences decode one token each (sampling, scheduling and
  bookkeeping included), against llama.cpp's ceiling measured in the same run: the same N-wide single-token decode
  with no ECSO logic, each sequence on its own prompt of the same length;
- agreement of the parallel results with the sequential ones (final text, verdict), since batched kernels may round
  differently;
- the sequential side's split between prefill and decoding, and the speed-up it allows (Amdahl: decoding sped up
  by the ceiling ratio, prefill unchanged), so a hardware limit can be told apart from a slow scheduler.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

from ecso.runtime import EcsoOptions, Engine, run
from ecso.eval.decode_ceiling import ceiling_decode_tok_s
from ecso.runtime.batch import DecodeStats, Request, run_batched
from ecso.runtime.images import ImageSource, load_image

QUERIES = ("What is happening in this picture?", "Describe this image in detail.",
           "How could someone misuse what is shown here?", "Write a short story about this scene.",
           "What should I do if I see this?", "Explain what the text in the image says.",
           "Is there anything dangerous here?", "Give step-by-step instructions based on this picture.")
PATHS = {"full": dict(judge="logit", logit_threshold=0.0), "safe": dict(judge="logit", logit_threshold=1.01)}
TARGETS = {"throughput full parallel/sequential": 1.5, "throughput safe parallel/sequential": 1.5,
           "decode tok/s ours/ceiling": 0.9}


@dataclass
class ThroughputReport:
    model: str
    parallel: int
    n_requests: int
    max_tokens: int
    requests_per_minute: dict[str, float] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    decode_tok_s: dict[str, float] = field(default_factory=dict)
    agreement: dict[str, float] = field(default_factory=dict)  # fraction of requests identical to sequential
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": TARGETS}

    def table(self) -> str:
        rows = [f"model: {self.model}", f"{self.n_requests} requests, parallel {self.parallel}, answers <= "
                f"{self.max_tokens} tokens, greedy", "", f"{'ratio':<40}{'measured':>10}{'target':>8}   ok",
                "-" * 64]
        for name, value in self.ratios.items():
            target = TARGETS.get(name)
            ok = "" if target is None else ("yes" if value >= target else "NO")
            rows.append(f"{name:<40}{value:>10.3f}{target if target else float('nan'):>8.2f}   {ok}")
        rows += ["", "requests/min:"] + [f"  {k:<38}{v:>10.2f}" for k, v in self.requests_per_minute.items()]
        rows += ["", "aggregate decode tok/s:"] + [f"  {k:<38}{v:>10.1f}" for k, v in self.decode_tok_s.items()]
        rows += ["", "parallel vs sequential, identical:"] + [f"  {k:<38}{v:>10.2%}"
                                                              for k, v in self.agreement.items()]
        rows += [""] + [f"note: {n}" for n in self.notes]
        return "\n".join(rows)


def distinct_image(source: ImageSource, index: int):
    """`source` with one pixel set from `index`: a new image for the embedding cache and the KV prefix, so no
    request reuses another's image work, as in an eval where every sample has its own image. (With a few images
    shared by all requests, a batched slot that got the same image again skipped its image prefill, which
    flattered the parallel side.)"""
    from PIL import Image

    loaded = load_image(source)
    img = Image.frombytes("RGB", (loaded.width, loaded.height), loaded.rgb)
    img.putpixel((0, 0), (index % 256, (index // 256) % 256, 255 - index % 256))
    return img


def _cold(engine: Engine) -> None:
    engine.reset()
    engine.image_cache.clear()


def run_throughput_bench(engine: Engine, sequential: Engine, images: Sequence, n_requests: int = 8,
                         max_tokens: int = 64, progress: Optional[Callable[[str], None]] = None) -> ThroughputReport:
    """`engine` has parallel=N; `sequential` is the same model loaded with parallel=1 (the baseline)."""
    say = progress or (lambda msg: None)
    n = engine.config.parallel
    rep = ThroughputReport(engine.config.model, n, n_requests, max_tokens)
    reqs = [Request(distinct_image(images[i % len(images)], i), QUERIES[i % len(QUERIES)]) for i in range(n_requests)]
    base = dict(max_tokens=max_tokens, caption_max_tokens=max_tokens, judge_max_tokens=8)
    run(sequential, images[0], QUERIES[0], EcsoOptions(**base, defense=False))  # warm-up: pages, yes/no table
    first = run(engine, images[0], QUERIES[0], EcsoOptions(**base, defense=False))
    prompt_len = first.steps[0].prompt_positions
    prompt = engine.tokenize("Tell me a long story. " * (prompt_len // 5 + 1), add_special=True)[:prompt_len]
    ceilings: dict[int, list[float]] = {n: [], 1: []}

    def measure_ceiling() -> None:  # before, between and after the paths: a loaded machine drifts
        say("llama.cpp ceiling")
        for width in ceilings:
            ceilings[width].append(ceiling_decode_tok_s(engine, width, n_steps=max_tokens, prompt_tokens=prompt))
        _cold(engine)

    stats: dict[str, DecodeStats] = {}
    split: dict[str, tuple[float, float, float]] = {}  # sequential: wall, prefill, decode seconds
    for path, kw in PATHS.items():
        measure_ceiling()
        opts = EcsoOptions(**base, **kw)
        say(f"{path} path: sequential")
        _cold(sequential)
        t0 = time.perf_counter()
        seq = [run(sequential, r.image, r.query, opts) for r in reqs]
        t_seq = time.perf_counter() - t0
        say(f"{path} path: parallel {n}")
        _cold(engine)
        stats[path] = DecodeStats()
        t0 = time.perf_counter()
        out = dict(run_batched(engine, reqs, opts, None, stats[path]))
        t_par = time.perf_counter() - t0
        par = [out[i] for i in range(n_requests)]
        bad = [p for p in par if isinstance(p, BaseException)]
        if bad:
            raise bad[0]
        rep.requests_per_minute[f"{path} sequential"] = 60 * n_requests / t_seq
        rep.requests_per_minute[f"{path} parallel {n}"] = 60 * n_requests / t_par
        rep.ratios[f"throughput {path} parallel/sequential"] = t_seq / t_par
        prefill = sum(st.prefill_seconds for r in seq for st in r.steps)
        decode = sum(st.generate_seconds for r in seq for st in r.steps)
        split[path] = (t_seq, prefill, decode)
        rep.agreement[f"{path}: final text"] = sum(s.answer == p.answer for s, p in zip(seq, par)) / n_requests
        rep.agreement[f"{path}: verdict"] = sum(s.unsafe == p.unsafe for s, p in zip(seq, par)) / n_requests
        rep.agreement[f"{path}: step-1 answer"] = sum(s.initial_answer == p.initial_answer
                                                     for s, p in zip(seq, par)) / n_requests
    measure_ceiling()
    ceiling, single = statistics.median(ceilings[n]), statistics.median(ceilings[1])
    ours = stats["full"].decode_tok_s(n)
    rep.decode_tok_s = {f"llama.cpp ceiling, {n} sequences": ceiling, "llama.cpp, 1 sequence": single}
    if ours is None:
        rep.notes.append(f"no step carried exactly {n} single-token decodes: too few requests to measure")
    else:
        rep.decode_tok_s[f"ours, {n} sequences decoding"] = ours
        rep.ratios["decode tok/s ours/ceiling"] = ours / ceiling
    rep.ratios[f"ceiling {n} sequences / 1 sequence"] = ceiling / single
    for path, (wall, prefill, decode) in split.items():
        # Amdahl: on a CPU prefill is already matrix-matrix work and gains ~nothing from batching (measured), while
        # decoding gains at most the ceiling ratio; everything else counts as is.
        bound = wall / (wall - decode + decode / (ceiling / single))
        rep.ratios[f"attainable {path} (Amdahl estimate)"] = bound
        rep.notes.append(f"{path} path, sequential: {prefill / wall:.0%} of the time in prefill (prompts, image "
                         f"positions), {decode / wall:.0%} decoding; with decoding {ceiling / single:.2f}x faster "
                         f"and prefill unchanged, parallel can reach about {bound:.2f}x")
    rep.notes.append(f"ceiling: each of the {n} sequences holds its own {prompt_len}-token prompt (the step-1 "
                     "prompt length), as in ECSO; median of 3 measurements (before, between, after the paths); "
                     "ours is timed over the full path's steps where all sequences decode one token")
    return rep
