"""`ecso bench`, native part: libecso (the C++ engine behind the C ABI) against the Python engine and
llama-cpp-python's `Llama`, side by side in one run, on the same GGUF, image, query and settings.

- request seconds: the same ECSO request (safe path: answer + appended logit judge), every request cold (KV and
  image caches emptied), native and Python interleaved round by round; median of per-round ratios.
- per-request overhead: request wall time minus the time inside the steps (prefill + generate): image loading,
  prompt rendering and tokenization, result building. What each engine adds around llama.cpp.
- decode tokens/s after the same text prompt: native, Python, `Llama`, one after another in each round.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

from ecso.eval.speed import decode_speed
from ecso.runtime import EcsoOptions, Engine, run

QUERY = "Describe this picture in detail."
DECODE_PROMPT = "Write a long story about a lighthouse keeper."  # the prompt eval/speed.py's decode test uses
RATIOS = ("request native/python", "decode tok/s native/python", "decode tok/s native/Llama")


@dataclass
class NativeBenchReport:
    library: str
    version: str
    repeats: int
    max_tokens: int
    ratios: dict[str, float] = field(default_factory=dict)
    values: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        rows = [f"native engine: {self.library} ({self.version})", f"{'ratio':<34}{'measured':>10}", "-" * 44]
        rows += [f"{k:<34}{v:>10.3f}" for k, v in self.ratios.items()]
        rows += ["", "medians:"] + [f"  {k:<32}{v:>10.3f}" for k, v in self.values.items()]
        rows += [f"note: {n}" for n in self.notes]
        return "\n".join(rows)


def _overhead_ms(seconds: float, steps) -> float:
    return 1000 * (seconds - sum(s["prefill_seconds"] + s["generate_seconds"] for s in steps))


def run_native_bench(engine: Engine, image, library: Optional[str] = None, repeats: int = 5, max_tokens: int = 64,
                     progress: Optional[Callable[[str], None]] = None) -> NativeBenchReport:
    from ecso.runtime.libecso import NativeEngine, find_library

    say = progress or (lambda msg: None)
    path = find_library(library)
    opts = EcsoOptions(max_tokens=max_tokens, judge="append-logit", logit_threshold=1.01)  # the safe path
    decode_opts = EcsoOptions(max_tokens=max(max_tokens, 64), defense=False)
    loaded = engine.load_image(image)
    samples: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        samples.setdefault(key, []).append(value)

    with NativeEngine(engine.config, path) as native:
        rep = NativeBenchReport(str(path), NativeEngine.version(path), repeats, max_tokens)
        native.run(loaded, "warm up", EcsoOptions(max_tokens=4, defense=False))
        for i in range(repeats):
            say(f"native round {i + 1}/{repeats}")
            def python_request():
                engine.reset()
                engine.image_cache.clear()
                return run(engine, loaded, QUERY, opts)

            def native_request():
                native.clear_cache()
                return native.run(loaded, QUERY, opts)

            if i % 2:  # alternate who goes first: drift hits both alike
                nat, py = native_request(), python_request()
            else:
                py, nat = python_request(), native_request()
            if nat["answer"] != py.answer:
                rep.notes.append(f"round {i + 1}: native and Python answers differ (should never happen)")
            add("request native/python", nat["seconds"] / py.seconds)
            add("request seconds python", py.seconds)
            add("request seconds native", nat["seconds"])
            add("overhead ms python", _overhead_ms(py.seconds, [asdict(s) for s in py.steps]))
            add("overhead ms native", _overhead_ms(nat["seconds"], nat["steps"]))

        def native_decode(_round: int) -> None:
            native.clear_cache()
            d = native.run(None, DECODE_PROMPT, decode_opts)["steps"][0]
            add("decode tok/s native", d["generated_tokens"] / d["generate_seconds"])

        # native, Python and Llama decode in the same round, round after round: drift hits all three alike
        ours, theirs = decode_speed(engine, repeats, decode_opts.max_tokens, say, each_round=native_decode)
    for o, t, n in zip(ours, theirs, samples["decode tok/s native"]):
        add("decode tok/s native/python", n / o)
        add("decode tok/s native/Llama", n / t)
    samples["decode tok/s python"], samples["decode tok/s Llama"] = ours, theirs
    rep.ratios = {k: statistics.median(samples[k]) for k in RATIOS}
    rep.values = {k: statistics.median(v) for k, v in samples.items() if k not in RATIOS}
    rep.notes.append("request = answer + appended logit judge (the safe path), cold caches, greedy; decode = the "
                     "same text prompt in every engine")
    return rep
