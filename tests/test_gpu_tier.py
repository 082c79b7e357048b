"""The GPU tier: ECSO's guarantees re-proven with every layer and the projector offloaded to a real GPU backend.

Runs where llama.cpp has a GPU device: `.ci/gpu-tier` builds llama-cpp-python with Vulkan and selects Mesa's lavapipe
(a Vulkan 1.3 device on the CPU: device buffers, shaders, the scheduler's CPU/device split all run for real; its
speed means nothing). Skipped on CPU builds; `python -m pytest -m gpu` selects it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from support.family_checks import QUERY, run_forced_unsafe
from support.gpu import model_files, offloaded, require_gpu, run_on_cpu

pytestmark = pytest.mark.gpu

TINY = ("tiny-llava", "qwen2vl", "gemma3", "llava-next")
# Measured on Vulkan/lavapipe (f32 weights, f32 KV cache, flash attention off): the tiny LLaVA's text logits are
# within 3.1e-2 of transformers (std 4.1; argmax equal everywhere), where the CPU backend is within 1.8e-5; with
# GGML_VK_DISABLE_F16=1 1.2e-2. The matmul pipelines for f32 weights accumulate in f32
# (ggml/src/ggml-vulkan/ggml-vulkan.cpp, ggml_vk_get_mul_mat_mat_f16acc returns false for F32), so the loss is in
# another shader of that backend; not yet narrowed down. Reuse stays bit-exact on the device (same kernels on both
# sides); comparisons across different computations (device vs CPU, batched vs alone, vs transformers) use these
# stated tolerances, with texts and verdicts equal.
DEVICE_LOGIT_TOL = 5e-2
DEVICE_SCORE_TOL = 1e-2
STEP_NAMES = ["answer", "judge", "caption", "regenerate"]


@pytest.fixture(scope="session", autouse=True)
def device():
    return require_gpu()


@pytest.fixture(scope="module")
def files(tiny):
    """name -> (llm, mmproj), built on first use (the CPU tests' builders and caches)."""
    cache = {"tiny-llava": (tiny.llm, tiny.mmproj)}

    def get(name):
        if name not in cache:
            cache[name] = model_files(name)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def engines(files):
    """name -> one exact-arithmetic engine on the device (f32 KV, flash attention off), shared by the module."""
    from ecso.runtime import Engine

    made = {}

    def get(name):
        if name not in made:
            made[name] = Engine(offloaded(*files(name)))
        return made[name]

    yield get
    for e in made.values():
        e.close()


def _steps(r):
    return [s.text for s in r.steps]


@pytest.mark.parametrize("name", TINY)
def test_every_layer_and_the_projector_run_on_the_device(engines, device, name):
    d = engines(name).describe()
    done, total = map(int, d["layers_offloaded"].split("/"))
    assert done == total > 1
    assert d["backend"] == device[0].backend != "CPU"
    assert d["devices"] and all(x.split(":")[0] in {dev.name for dev in device} for x in d["devices"])
    assert d["gpu_backend"] and d["mmproj_gpu"] and d["flash_attn"] is False


@pytest.mark.parametrize("name", TINY)
def test_four_steps_on_the_device_reuse_is_bit_exact_and_encodes_once(engines, street_png, name):
    e = engines(name)
    a = run_forced_unsafe(e, street_png, reuse=True)
    b = run_forced_unsafe(e, street_png, reuse=False)
    assert [s.name for s in a.steps] == STEP_NAMES and a.unsafe
    assert _steps(a) == _steps(b)
    assert a.judge_score == b.judge_score  # bit-identical logits
    assert (a.image_encodes, b.image_encodes) == (1, 3)
    assert a.steps[1].reused_positions > 0


_CPU_RUN = """
import json
from ecso.runtime import Engine, EngineConfig
from ecso.runtime.ecso import EcsoOptions, run
with Engine(EngineConfig(model={llm!r}, mmproj={mmproj!r}, n_ctx=2048, kv_f32=True, flash_attn=False)) as e:
    assert e.describe()["backend"] == "CPU", e.describe()
    r = run(e, {image!r}, {query!r}, EcsoOptions(max_tokens=10, caption_max_tokens=10, judge="logit",
                                                   logit_threshold=0.0))
    print(json.dumps({{"texts": [s.text for s in r.steps], "score": r.judge_score, "unsafe": r.unsafe}}))
"""


@pytest.mark.parametrize("name", TINY)
def test_four_steps_on_the_device_give_the_cpu_backends_texts(engines, files, street_png, name):
    """Same llama.cpp build, device hidden (CPU backend) vs every layer on the device: f32 weights and KV, greedy:
    the same texts (Qwen2-VL: the first two steps), the judge score within DEVICE_SCORE_TOL (measured on the tiny LLaVA: 0.8249 vs 0.8262)."""
    llm, mmproj = files(name)
    on_device = run_forced_unsafe(engines(name), street_png, reuse=True)
    p = run_on_cpu(_CPU_RUN.format(llm=str(llm), mmproj=str(mmproj), image=str(street_png), query=QUERY))
    assert p.returncode == 0, p.stderr[-2000:]
    cpu = json.loads(p.stdout.strip().splitlines()[-1])
    print(f"\n{name}: judge score device {on_device.judge_score!r} cpu {cpu['score']!r}")
    # Qwen2-VL: the answer and the verdict are equal, but its caption (step 3) took another greedy token on the
    # device (measured: 'GangPrince ...' on CPU, 'Cour concentration ...' on lavapipe): the random tiny model's
    # near-flat distribution meets the device's logit error above; the regenerated answer follows the caption.
    n_equal = 2 if name == "qwen2vl" else 4
    assert _steps(on_device)[:n_equal] == cpu["texts"][:n_equal]
    assert on_device.judge_score == pytest.approx(cpu["score"], abs=DEVICE_SCORE_TOL)
    assert on_device.unsafe == cpu["unsafe"]


def test_embedding_cache_and_one_encode_per_request_on_the_device(engines, street_png):
    from ecso.runtime.ecso import EcsoOptions, run

    e = engines("tiny-llava")
    e.reset()
    e.image_cache.clear()
    opts = EcsoOptions(max_tokens=6, caption_max_tokens=6, judge="logit", logit_threshold=0.0)
    first = run(e, street_png, QUERY, opts)
    e.reset()  # an empty KV cache: the image still comes from the embedding cache
    second = run(e, street_png, QUERY, opts)
    assert (first.image_encodes, first.image_cache_hit) == (1, False)
    assert (second.image_encodes, second.image_cache_hit) == (0, True)
    assert _steps(first) == _steps(second) and first.judge_score == second.judge_score


def test_cancellation_on_the_device_stops_and_leaves_the_engine_consistent(engines, street_png):
    from ecso.runtime import Cancelled
    from ecso.runtime.ecso import EcsoOptions, run

    e = engines("tiny-llava")
    opts = EcsoOptions(max_tokens=8, caption_max_tokens=8, judge="logit", logit_threshold=0.0)
    e.reset()
    reference = run(e, street_png, QUERY, opts)
    checks = []

    def cancel_on_the_sixth_check() -> bool:
        checks.append(e.n_past)
        return len(checks) >= 6

    with pytest.raises(Cancelled):
        run(e, street_png, "Another question, " + QUERY, opts, should_cancel=cancel_on_the_sixth_check)
    assert len(checks) == 6
    again = run(e, street_png, QUERY, opts)
    assert _steps(again) == _steps(reference) and again.judge_score == reference.judge_score


def test_context_overflow_on_the_device_is_refused_before_any_evaluation(engines, street_png):
    from ecso.runtime import ContextOverflowError
    from ecso.runtime.ecso import EcsoOptions, run

    e = engines("tiny-llava")
    seen = []
    e.observer = lambda kind, what, pos: seen.append(kind)
    try:
        with pytest.raises(ContextOverflowError, match="more than the context"):
            run(e, street_png, "why " * 3000, EcsoOptions(max_tokens=8))
    finally:
        e.observer = None
    assert seen == []
    assert run(e, street_png, QUERY, EcsoOptions(max_tokens=4)).steps[0].generated_tokens >= 1


@pytest.mark.parametrize("name", ["tiny-llava", "qwen2vl"])
def test_batched_requests_on_the_device_equal_the_requests_run_alone(engines, files, street_png, tmp_path, name):
    """parallel=4 (one KV stream per sequence, every stream on the device): each request's steps equal the same
    request run alone on sequence 0 (texts equal; judge score within DEVICE_SCORE_TOL: another batch composition
    runs other kernels, measured 1.8e-4 on the tiny LLaVA), and each image is encoded once."""
    from PIL import Image

    from ecso.runtime import Ecso
    from ecso.runtime.ecso import EcsoOptions, run

    wide = tmp_path / "wide.png"
    Image.fromarray((np.random.default_rng(1).random((90, 160, 3)) * 255).astype("uint8")).save(wide)
    opts = EcsoOptions(max_tokens=8, caption_max_tokens=8, judge="logit", logit_threshold=0.0)
    reqs = [(str(wide), QUERY), (str(street_png), "Describe the colours."), (str(wide), "Is it safe?"),
            (str(street_png), QUERY)]
    e = engines(name)
    alone = []
    for image, query in reqs:
        e.reset()
        alone.append(run(e, image, query, opts))
    with Ecso(offloaded(*files(name), parallel=4), opts) as batched:
        assert batched.engine.describe()["backend"] != "CPU"
        together = batched.run_many(reqs)
    for a, b in zip(alone, together):
        assert [s.name for s in b.steps] == STEP_NAMES
        assert _steps(b) == _steps(a)
        assert b.judge_score == pytest.approx(a.judge_score, abs=DEVICE_SCORE_TOL)
        assert b.unsafe == a.unsafe
    assert sum(b.image_encodes for b in together) == 2


def test_text_logits_on_the_device_match_transformers(engines, tiny):
    """Tiny LLaVA, f32 weights and KV, every layer on the device: within DEVICE_LOGIT_TOL (measured 3.06e-2; the
    CPU backend: 1.8e-5), argmax equal at every position. Pinned so a more exact Vulkan backend is noticed."""
    import torch
    import transformers

    from support.family_checks import assert_text_logits_match

    e = engines("tiny-llava")
    model = transformers.LlavaForConditionalGeneration.from_pretrained(str(tiny.hf), dtype=torch.float32).eval()
    ids = e.tokenize("USER: Is the RESPONSE harmful, unsafe and unethical? ASSISTANT: no", True)
    diff = assert_text_logits_match(e, model, ids, "tiny-llava on the device", DEVICE_LOGIT_TOL)
    assert diff > 1e-4, "the device now matches transformers as closely as the CPU: tighten DEVICE_LOGIT_TOL"


@pytest.fixture(scope="module")
def demo_on_device(files):
    """The demo model with the default configuration (f16 KV, the default flash-attention choice), all offloaded."""
    from ecso.runtime import Engine

    with Engine(offloaded(*files("demo"), exact=False)) as e:
        yield e


@pytest.mark.gpu_demo
def test_demo_model_four_steps_on_the_device_with_the_defaults_reuse_is_bit_exact(demo_on_device, street_png):
    e = demo_on_device
    d = e.describe()
    assert d["layers_offloaded"] == "31/31" and d["mmproj_gpu"] and d["kv_type"] == "f16"
    a = run_forced_unsafe(e, street_png, reuse=True)
    b = run_forced_unsafe(e, street_png, reuse=False)
    assert [s.name for s in a.steps] == STEP_NAMES
    assert _steps(a) == _steps(b) and a.judge_score == b.judge_score
    assert (a.image_encodes, b.image_encodes) == (1, 3)


def test_doctor_lists_the_device_and_ecso_run_answers_with_every_layer_offloaded(device, street_png):
    """What a user checks after the Vulkan install: `ecso doctor` shows the device and the demo model's offload, and
    `ecso-run -ngl -1` answers with every layer and the projector on it (recorded in the result's engine)."""
    import subprocess
    import sys

    doctor = subprocess.run([sys.executable, "-m", "ecso.cli.main", "doctor", "--json", "--no-smoke"],
                            capture_output=True, text=True, timeout=600)
    assert doctor.returncode == 0, doctor.stderr[-2000:]
    report = json.loads(doctor.stdout)
    names = {d["name"] for d in report["devices"] if d["type"] != "cpu"}
    assert {d.name for d in device} <= names and report["gpu_offload"] is True
    done, total = map(int, report["offload"]["layers_offloaded"].split("/"))
    assert done == total > 1
    run = subprocess.run(["ecso-run", "-ngl", "-1", "--image", str(street_png),
                          "--max-tokens", "4", "--json", "What is in the picture?"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    engine = json.loads(run.stdout)["engine"]
    assert engine["layers_offloaded"] == f"{total}/{total}" and engine["mmproj_gpu"] and engine["gpu_backend"]
    assert engine["devices"]
