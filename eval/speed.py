"""`ecso bench`: what ECSO costs, measured side by side in one run (machines are noisy: report ratios).

Every measured request starts cold (KV cache cleared, image-embedding cache emptied), greedy, same image and
query, interleaved round-robin over the variants so drift hits all of them alike; each ratio is the median over
repeats of per-round ratios.

- safe path / plain: ECSO whose judge finds the answer safe, against the same engine answering without ECSO.
  The safe-path time is step 1 + step 2 (what a safe answer costs, whatever this model's verdict was).
- full 4-step path with reuse / without reuse (the naive way: every step clears the KV cache and re-encodes).
- decode tokens/s of our engine / llama-cpp-python's high-level `Llama` on the same GGUF and prompt.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

from ecso.runtime import EcsoOptions, Engine, Message, Result, Sampling, run
from ecso.runtime.kv import ImagePiece
from ecso.runtime.llama_settings import default_model_params_without_repack

QUERY = "Describe this picture in detail, then tell a long story about it."

SAFE_JUDGES = {
    "append-logit": dict(judge="append-logit", logit_threshold=1.01),
    "logit": dict(judge="logit", logit_threshold=1.01),
    "append": dict(judge="append"),
    "paper": dict(judge="paper"),
}
TARGETS = {"safe/plain append-logit": 1.05, "safe/plain logit": 1.05, "safe/plain append": 1.05,
           "safe/plain paper": 1.15, "full reuse/no-reuse": 0.6, "decode tok/s ours/Llama": 1.0}


# Vulkan devices that run on the CPU (Mesa's lavapipe shows as "llvmpipe", Google's SwiftShader): they exercise
# the GPU code paths, but their timings say nothing about a GPU
CPU_EMULATED_DEVICES = ("llvmpipe", "lavapipe", "swiftshader")


def device_report(engine: Engine) -> dict:
    """The backend and devices the engine ran on (from `Engine.describe()`), and a plain warning when the device is
    a CPU emulating a GPU."""
    d = engine.describe()
    out = {k: d.get(k) for k in ("backend", "devices", "layers_offloaded", "mmproj_gpu", "flash_attn", "kv_type",
                                 "n_threads")}
    emulated = [dev for dev in d.get("devices") or [] if any(n in dev.lower() for n in CPU_EMULATED_DEVICES)]
    out["cpu_emulated_device"] = bool(emulated)
    if emulated:
        out["note"] = (f"ran on {emulated[0]}, a Vulkan device emulated on the CPU (Mesa lavapipe): these timings "
                       "are NOT GPU timings; they only show that the GPU code paths run")
    return out


@dataclass
class BenchReport:
    model: str
    mmproj: Optional[str]
    image_tokens: int
    max_tokens: int
    repeats: int
    ratios: dict[str, float] = field(default_factory=dict)  # median ratios
    seconds: dict[str, float] = field(default_factory=dict)  # median absolute times
    image_encodes_per_request: dict[str, float] = field(default_factory=dict)
    floors: dict[str, float] = field(default_factory=dict)  # the ratio each design implies (extra positions / work)
    notes: list[str] = field(default_factory=list)
    device: dict = field(default_factory=dict)  # backend, devices, layers offloaded (device_report)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = TARGETS
        return d

    def table(self) -> str:
        dev = self.device
        where = ", ".join(dev.get("devices") or []) or "CPU"
        rows = [f"model: {self.model}", f"backend: {dev.get('backend', '?')} ({where}), layers offloaded "
                f"{dev.get('layers_offloaded', '?')}", f"image tokens: {self.image_tokens}, answer tokens <= {self.max_tokens}, "
                f"repeats: {self.repeats} (median of per-round ratios)", "",
                f"{'ratio':<28}{'measured':>10}{'target':>10}   ok", "-" * 54]
        for name, value in self.ratios.items():
            target = TARGETS.get(name)
            better_low = not name.startswith("decode")
            ok = "" if target is None else ("yes" if (value <= target if better_low else value >= target) else "NO")
            rows.append(f"{name:<28}{value:>10.3f}{(target if target else float('nan')):>10.2f}   {ok}")
        rows += ["", f"{'median seconds':<28}"] + [f"  {k:<26}{v:>10.3f}" for k, v in self.seconds.items()]
        rows += ["", "image encodes per request: " + ", ".join(f"{k}={v:g}" for k, v in
                                                              self.image_encodes_per_request.items())]
        if self.floors:
            rows += ["", "floors implied by the design (extra evaluated positions / plain positions):"]
            rows += [f"  {k:<26}{v:>10.3f}" for k, v in self.floors.items()]
        rows += [""] + [f"note: {n}" for n in self.notes]
        return "\n".join(rows)


def _cold(engine: Engine) -> None:
    engine.reset()
    engine.image_cache.clear()


def _safe_path_seconds(r: Result) -> float:
    return sum(s.seconds for s in r.steps if s.name in ("answer", "judge"))


def run_bench(engine: Engine, image, repeats: int = 5, max_tokens: int = 64, query: str = QUERY,
              progress: Optional[Callable[[str], None]] = None) -> BenchReport:
    say = progress or (lambda msg: None)
    base = dict(max_tokens=max_tokens, caption_max_tokens=max_tokens, judge_max_tokens=8)
    loaded = engine.load_image(image)
    prompt, _ = engine.build_prompt([Message("user", query)], loaded)
    img_tokens = sum(p.n_pos for p in prompt.pieces if isinstance(p, ImagePiece))
    rep = BenchReport(engine.config.model, engine.config.mmproj, img_tokens, max_tokens, repeats)
    rep.device = device_report(engine)
    if rep.device.get("note"):
        rep.notes.append(rep.device["note"])
    samples: dict[str, list[float]] = {}
    encodes: dict[str, list[int]] = {}
    extra_pos: dict[str, list[float]] = {}

    def add(key, value):
        samples.setdefault(key, []).append(value)

    # warm-up: load pages, build the yes/no table
    _cold(engine)
    run(engine, loaded, query, EcsoOptions(**base, defense=False))
    for i in range(repeats):
        say(f"round {i + 1}/{repeats}")
        _cold(engine)
        plain = run(engine, loaded, query, EcsoOptions(**base, defense=False))
        add("plain", plain.seconds)
        for name, kw in SAFE_JUDGES.items():
            _cold(engine)
            r = run(engine, loaded, query, EcsoOptions(**base, **kw))
            t = _safe_path_seconds(r)
            add(f"safe {name}", t)
            add(f"safe/plain {name}", t / plain.seconds)
            judge = r.steps[1]
            extra_pos.setdefault(name, []).append(
                (judge.evaluated_positions + judge.generated_tokens) /
                (r.steps[0].evaluated_positions + r.steps[0].generated_tokens))
        _cold(engine)
        full = run(engine, loaded, query, EcsoOptions(**base, judge="logit", logit_threshold=0.0))
        _cold(engine)
        naive = run(engine, loaded, query, EcsoOptions(**base, judge="logit", logit_threshold=0.0, reuse=False))
        add("full reuse", full.seconds)
        add("full no-reuse", naive.seconds)
        add("full reuse/no-reuse", full.seconds / naive.seconds)
        encodes.setdefault("full reuse", []).append(full.image_encodes)
        encodes.setdefault("full no-reuse", []).append(naive.image_encodes)
        if full.answer != naive.answer:
            rep.notes.append(f"round {i + 1}: reuse and no-reuse answers differ (should never happen)")
    ours, theirs = decode_speed(engine, repeats, max(max_tokens, 64), say)
    rep.ratios["decode tok/s ours/Llama"] = statistics.median(o / t for o, t in zip(ours, theirs))
    rep.seconds["decode tok/s ours"] = statistics.median(ours)
    rep.seconds["decode tok/s Llama"] = statistics.median(theirs)
    for key, values in samples.items():
        target = rep.ratios if "/" in key else rep.seconds
        target[key] = statistics.median(values)
    rep.ratios = dict(sorted(rep.ratios.items(), key=lambda kv: list(TARGETS).index(kv[0])
                             if kv[0] in TARGETS else 99))
    rep.image_encodes_per_request = {k: statistics.mean(v) for k, v in encodes.items()}
    rep.floors = {f"safe/plain {k}": 1 + statistics.median(v) * 0.4 for k, v in extra_pos.items()}
    rep.notes.append("floors assume a re-read prompt position costs ~0.4 of a generated token (CPU, 2 threads); "
                     "on GPUs prefill is far cheaper than decode and the paper judge's floor drops toward 1")
    rep.notes.append(f"plain answer: {plain.steps[0].generated_tokens} tokens; full path regenerates "
                     f"{full.steps[-1].generated_tokens} tokens")
    return rep


def decode_speed(engine: Engine, repeats: int, n_tokens: int, say,
                 each_round: Optional[Callable[[int], None]] = None) -> tuple[list[float], list[float]]:
    """Decode tokens/s after the same text prompt: our engine vs llama-cpp-python's `Llama` (same GGUF, threads,
    context size, KV type, flash-attention setting). `each_round(i)` runs at the start of every round, so a third
    engine measured there sees the same machine state (drift, thermal, other load) as these two."""
    import llama_cpp

    prompt, _ = engine.build_prompt([Message("user", "Write a long story about a lighthouse keeper.")])
    tokens = [t for p in prompt.pieces for t in p.tokens]
    # the reference loads with the same CPU-repack choice as ours (a stock Llama on an AMX build would crash)
    with default_model_params_without_repack(engine.cpu_repack):
        llm = llama_cpp.Llama(model_path=engine.config.model, n_ctx=engine.n_ctx, n_threads=engine.n_threads,
                              n_threads_batch=engine.n_threads, n_gpu_layers=engine.n_gpu_layers, verbose=False,
                              flash_attn=engine.flash_attn, type_k=0 if engine.config.kv_f32 else 1,
                              type_v=0 if engine.config.kv_f32 else 1)
    ours, theirs = [], []
    try:
        for i in range(repeats):
            say(f"decode speed {i + 1}/{repeats}")
            if each_round is not None:
                each_round(i)
            engine.reset()
            engine.prefill(prompt, reuse=False)
            g = engine.generate(Sampling(max_tokens=n_tokens))
            ours.append(len(g.tokens) / g.seconds)
            llm.reset()
            n, t0 = 0, None
            for tok in llm.generate(tokens, temp=0.0, top_k=1, reset=True):
                if t0 is None:  # the first token comes right after the prompt: time from there
                    t0 = time.perf_counter()
                    continue
                n += 1
                if n >= len(g.tokens) or llm.token_eos() == tok:
                    break
            theirs.append(n / (time.perf_counter() - t0))
    finally:
        llm.close()
    return ours, theirs
