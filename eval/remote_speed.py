"""`ecso bench --backend URL`: what ECSO costs through an OpenAI-compatible server, side by side in one run.

- safe path / plain: ECSO whose judge finds the answer safe (steps 1 + 2) against the same server answering
  without ECSO (step 1 only); for the paper judge (a generated reply) and the logit judge (one token + logprobs).
- full path / plain: all four steps against step 1 only.
- eval throughput: requests per minute with 1, 2 and 4 ECSO requests in flight (the server batches them; start it
  with as many slots, e.g. `llama-server -np 4`).

Every request of the cost rounds uses an image no earlier request used (one pixel changes), so the server's prefix
cache helps only within a request (steps 1-3 share `system + image`), never across rounds. Variants are interleaved
round-robin so drift hits all of them alike; ratios are medians of per-round ratios.
"""

from __future__ import annotations

import hashlib
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Optional

from ecso.runtime import Ecso, EcsoOptions, RemoteConfig, StepEvent, run
from ecso.runtime.images import LoadedImage, load_image

QUERY = "Describe this picture in detail, then tell a long story about it."
NEVER_UNSAFE = 1.01  # a logit threshold no P(yes) reaches: the safe path, whatever the model thinks


@dataclass
class RemoteBenchReport:
    url: str
    model: str
    max_tokens: int
    repeats: int
    seconds: dict[str, float] = field(default_factory=dict)  # median wall seconds per variant
    ratios: dict[str, float] = field(default_factory=dict)
    cached_tokens: dict[str, float] = field(default_factory=dict)  # median cached prompt tokens per request
    throughput: dict[int, float] = field(default_factory=dict)  # requests in flight -> requests per minute
    throughput_requests: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        rows = [f"backend: {self.url} (model {self.model}); answer tokens <= {self.max_tokens}, "
                f"repeats: {self.repeats} (median of per-round ratios)", "",
                f"{'variant':<26}{'seconds':>9}{'cached tok':>12}", "-" * 47]
        rows += [f"{k:<26}{v:>9.2f}{self.cached_tokens.get(k, 0):>12.0f}" for k, v in self.seconds.items()]
        rows += ["", f"{'ratio':<26}{'measured':>9}", "-" * 35]
        rows += [f"{k:<26}{v:>9.2f}" for k, v in self.ratios.items()]
        if self.throughput:
            base = self.throughput.get(1)
            rows += ["", f"eval throughput ({self.throughput_requests} full-path requests per setting)",
                     f"{'in flight':<12}{'req/min':>9}{'vs 1':>8}", "-" * 29]
            rows += [f"{n:<12}{rpm:>9.1f}{(rpm / base if base else 0):>8.2f}" for n, rpm in self.throughput.items()]
        return "\n".join(rows)


def variant_image(base: LoadedImage, index: int) -> LoadedImage:
    """`base` with one pixel set from `index`: a new image to the server's prefix cache, the same to the eye."""
    rgb = bytearray(base.rgb)
    rgb[0:3] = bytes(((index >> 16) & 255, (index >> 8) & 255, index & 255))
    return LoadedImage(bytes(rgb), base.width, base.height, hashlib.sha256(rgb).hexdigest(), base.source)


VARIANTS: dict[str, dict] = {
    "plain": dict(defense=False),
    "safe paper": dict(judge="paper"),  # timed to the end of step 2 (the model's verdict does not matter)
    "safe logit": dict(judge="logit", logit_threshold=NEVER_UNSAFE),
    "full": dict(judge="always-unsafe"),
}


def timed_run(app: Ecso, image: LoadedImage, options: EcsoOptions, until_step: Optional[str]) -> tuple[float, int]:
    """Wall seconds to the end of `until_step` (None: the whole request) and the cached prompt tokens reported."""
    t0 = time.perf_counter()
    stamp: dict[str, float] = {}

    def on_event(event: StepEvent) -> None:
        if event.kind == "step_end":
            stamp[event.step] = time.perf_counter() - t0

    result = run(app.engine, image, QUERY, options, on_event=on_event)
    seconds = stamp[until_step] if until_step else time.perf_counter() - t0
    return seconds, sum(s.reused_positions for s in result.steps)


def run_remote_bench(config: RemoteConfig, image_source, repeats: int = 3, max_tokens: int = 64,
                     parallels: tuple[int, ...] = (1, 2, 4), n_requests: int = 8,
                     progress: Callable[[str], None] = lambda m: None) -> RemoteBenchReport:
    base = load_image(image_source, config.image_limits)
    report = RemoteBenchReport(config.url, config.model, max_tokens, repeats, throughput_requests=n_requests)
    app = Ecso(config)
    counter = 0
    times: dict[str, list[float]] = {k: [] for k in VARIANTS}
    cached: dict[str, list[int]] = {k: [] for k in VARIANTS}
    for round_ in range(repeats + 1):  # round 0 warms the server up and is not counted
        for name, kw in VARIANTS.items():
            counter += 1
            options = EcsoOptions(max_tokens=max_tokens, caption_max_tokens=max_tokens, **kw)
            until = "judge" if name.startswith("safe") else None
            seconds, reused = timed_run(app, variant_image(base, counter), options, until)
            if round_ > 0:
                times[name].append(seconds)
                cached[name].append(reused)
        progress(f"cost round {round_}/{repeats}" + (" (warm-up)" if round_ == 0 else ""))
    report.seconds = {k: statistics.median(v) for k, v in times.items()}
    report.cached_tokens = {k: statistics.median(v) for k, v in cached.items()}
    for name in ("safe paper", "safe logit", "full"):
        report.ratios[f"{name}/plain"] = statistics.median(a / b for a, b in zip(times[name], times["plain"]))
    full = EcsoOptions(max_tokens=max_tokens, caption_max_tokens=max_tokens, judge="always-unsafe")
    for parallel in parallels:
        many = Ecso(replace(config, parallel=parallel), full)  # connections are per request: nothing to load
        requests = []
        for _ in range(n_requests):
            counter += 1
            requests.append((variant_image(base, counter), QUERY))
        t0 = time.perf_counter()
        many.run_many(requests)
        report.throughput[parallel] = 60.0 * n_requests / (time.perf_counter() - t0)
        progress(f"throughput with {parallel} in flight: {report.throughput[parallel]:.1f} requests/min")
    return report
