"""libecso against the Python engine and llama-cpp-python's `Llama`, interleaved round by round (the order flips
every round), so a shared, noisy machine's load hits all of them alike:
- decode tokens/s after the same text prompt (64 greedy tokens): native, Python engine, `Llama`;
- request seconds of the safe path (answer + appended logit judge, 32 tokens, cold caches): native, Python.
Prints the medians and the medians of the per-round ratios.

    python tests/native/interleaved_speed.py LLM.gguf MMPROJ.gguf ROUNDS [THREADS]   (after cmake --build build)

THREADS (default: all cores) = 1 keeps OpenMP's thread barriers out of the numbers on an oversubscribed machine.
"""
import statistics
import sys
import time
from pathlib import Path

import llama_cpp
from ecso.runtime import EcsoOptions, Engine, EngineConfig, Message, run
from ecso.runtime.libecso import NativeEngine
from ecso.eval.speed import default_model_params_without_repack

llm_path, mmproj, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
threads = int(sys.argv[4]) if len(sys.argv) > 4 else None
cfg = EngineConfig(model=llm_path, mmproj=mmproj, n_threads=threads)
engine = Engine(cfg)
native = NativeEngine(cfg)  # build/libecso.so of this checkout, or $ECSO_LIBECSO
PROMPT = "Write a long story about a lighthouse keeper."
opts = EcsoOptions(max_tokens=64, defense=False)
prompt, _ = engine.build_prompt([Message("user", PROMPT)])
tokens = [t for p in prompt.pieces for t in p.tokens]
with default_model_params_without_repack(engine.cpu_repack):
    llm = llama_cpp.Llama(model_path=llm_path, n_ctx=engine.n_ctx, n_threads=engine.n_threads,
                          n_threads_batch=engine.n_threads, verbose=False, flash_attn=engine.flash_attn,
                          type_k=1, type_v=1)
img = engine.load_image(Path(__file__).resolve().parents[2] / "examples" / "street.png")
sq = EcsoOptions(max_tokens=32, judge="append-logit", logit_threshold=1.01)
res = {k: [] for k in ("native", "python", "Llama", "req native", "req python")}
for i in range(rounds):
    order = ["n", "p", "l"] if i % 2 == 0 else ["l", "p", "n"]
    for who in order:
        if who == "n":
            native.clear_cache()
            s = native.run(None, PROMPT, opts)["steps"][0]
            res["native"].append(s["generated_tokens"] / s["generate_seconds"])
        elif who == "p":
            engine.reset()
            engine.image_cache.clear()
            s = run(engine, None, PROMPT, opts).steps[0]
            res["python"].append(s.generated_tokens / s.generate_seconds)
        else:
            n, t0 = 0, None
            for tok in llm.generate(tokens, temp=0.0, top_k=1, reset=True):
                if t0 is None:
                    t0 = time.perf_counter()
                    continue
                n += 1
                if n >= 64 or llm.token_eos() == tok:
                    break
            res["Llama"].append(n / (time.perf_counter() - t0))
    for who in (["n", "p"] if i % 2 == 0 else ["p", "n"]):
        if who == "n":
            native.clear_cache()
            res["req native"].append(native.run(img, "Describe this picture.", sq)["seconds"])
        else:
            engine.reset()
            engine.image_cache.clear()
            res["req python"].append(run(engine, img, "Describe this picture.", sq).seconds)
med = {k: statistics.median(v) for k, v in res.items()}
ratios = {
    "decode native/python": statistics.median([a / b for a, b in zip(res["native"], res["python"])]),
    "decode native/Llama": statistics.median([a / b for a, b in zip(res["native"], res["Llama"])]),
    "request native/python": statistics.median([a / b for a, b in zip(res["req native"], res["req python"])]),
}
print("medians:", {k: round(v, 4) for k, v in med.items()})
print("ratios (median of per-round):", {k: round(v, 4) for k, v in ratios.items()})
native.close()
engine.close()
llm.close()
