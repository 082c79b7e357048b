"""The VLM families of 2025-2026 (Qwen3-VL, ...), proven like the older ones in tests/test_families.py: tiny random
checkpoints built with transformers' own classes, converted by llama.cpp's own converter (cached per machine),
loaded once per session. Measured numbers are printed (pytest -s) and recorded in docs/families.md.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from support.family_checks import (QUERY, assert_q8_reuse_exact, converted_families, ecso_run_four_steps,
                                   evaluated_ids, exact_engines, gguf_value, image_chunks, wide_image)
from support.family_checks import run_forced_unsafe as _run

PASSING = ("qwen3vl", "mistral3", "lfm2vl", "glm4v")  # every proof below
FAMILIES = PASSING


@pytest.fixture(scope="session")
def families():
    return converted_families(FAMILIES)


@pytest.fixture(scope="session")
def engines(families):
    """One exact-arithmetic engine per family (f32 KV, flash attention off), shared by the session."""
    yield from exact_engines(families)


@pytest.fixture(scope="session")
def wide_png(tmp_path_factory) -> Path:
    """A non-square image (160x90)."""
    return wide_image(tmp_path_factory)


def test_qwen3vl_image_rows_are_n_embd_inp_wide_with_its_deepstack_features(families, engines, street_png):
    """Qwen3-VL's projector emits n_embd x (1 + deepstack layers) floats per image token (the main embedding, then
    one slice per deepstack layer, added to the hidden state of the first LLM layers). The engine must copy, cache
    and feed back rows of that width (`llama_model_n_embd_inp`), not the hidden size: with n_embd-wide copies
    llama.cpp read past the copied buffer and the same request gave different answers from run to run."""
    from ecso.runtime.prompts import Message

    c, e = families["qwen3vl"], engines["qwen3vl"]
    deepstack = sum(bool(v[0]) for v in gguf_value(c.mmproj, "clip.vision.is_deepstack_layers"))
    (proj_dim,) = gguf_value(c.mmproj, "clip.vision.projection_dim")[0]
    assert (deepstack, proj_dim, e.n_embd) == (2, 64, 64)
    assert e.n_embd_inp == e.n_embd * (1 + deepstack)
    prompt, _ = e.build_prompt([Message("user", QUERY)], e.load_image(street_png))
    entry = next(iter(prompt.images.values()))
    (embd,) = e._encode(entry)
    assert embd.size == entry.chunk.images[0].n_tokens * e.n_embd_inp
    assert np.isfinite(embd).all() and np.abs(embd[-e.n_embd:]).max() > 0  # the last deepstack slice is real data


def test_qwen3vl_same_request_twice_and_without_reuse_gives_identical_steps(engines, street_png):
    e = engines["qwen3vl"]
    first, again, naive = _run(e, street_png, reuse=True), _run(e, street_png, reuse=True), _run(e, street_png,
                                                                                                  reuse=False)
    texts = [s.text for s in first.steps]
    assert [s.name for s in first.steps] == ["answer", "judge", "caption", "regenerate"]
    assert texts == [s.text for s in again.steps] == [s.text for s in naive.steps]
    assert all(texts[i] for i in (0, 2, 3))  # greedy decoding of a random model: never empty
    assert (first.image_encodes, naive.image_encodes) == (1, 3)


# ------------------------------------------------------------------------------------------------ every family
PROJECTOR = {"qwen3vl": "qwen3vl_merger", "mistral3": "pixtral", "lfm2vl": "lfm2", "glm4v": "glm4v"}
IMAGE_TOKEN = {"qwen3vl": "<|image_pad|>", "mistral3": "[IMG]", "lfm2vl": "<image>", "glm4v": "<|image|>"}
# llama.cpp vs transformers, f32 weights and KV cache, text-only logits (std ~1)
LOGIT_TOL = {"qwen3vl": 2e-4, "mistral3": 2e-4, "lfm2vl": 2e-4, "glm4v": 2e-4}


@pytest.mark.parametrize("family", PASSING)
def test_converted_family_loads_with_its_projector(families, engines, family):
    (kind,) = gguf_value(families[family].mmproj, "clip.projector_type")
    assert bytes(kind).decode() == PROJECTOR[family]
    e = engines[family]
    assert e.has_vision and e.chat_format.name == "gguf-template"
    assert e.kv_rollback == (family != "lfm2vl")  # LFM2's short convolutions are a recurrent state
    assert e.describe()["kv_prefix_reuse"].startswith("rollback" if e.kv_rollback else "append-only")


@pytest.mark.parametrize("family", PASSING)
def test_text_logits_match_transformers(families, engines, family):
    import transformers

    from support.family_checks import assert_hf_text_logits_match

    c = families[family]
    assert_hf_text_logits_match(engines[family], c.hf, getattr(transformers, c.architecture), family,
                                LOGIT_TOL[family])


def _expected_ids(family: str, c, n: int) -> list[int]:
    """The family's own prompt for [image, QUERY]: the HF chat template + the processor's image expansion, with
    the number of image tokens llama.cpp chose (its resize policy is its own)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(c.hf))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUERY}]}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    if family == "lfm2vl":  # Lfm2VlProcessor, one tile: <|image_start|> n x <image> <|image_end|>
        text = text.replace("<image>", "<|image_start|>" + "<image>" * n + "<|image_end|>")
    elif family == "mistral3":  # PixtralProcessor: rows of [IMG] closed by [IMG_BREAK], the last by [IMG_END];
        # llama.cpp makes the [IMG_BREAK]s embedding rows of the image chunk (its n counts them), then [IMG_END]
        text = text.replace("[IMG]", "[IMG]" * n + "[IMG_END]")
    else:
        text = text.replace(IMAGE_TOKEN[family], IMAGE_TOKEN[family] * n)
    return tok(text, add_special_tokens=family == "mistral3" and not text.startswith("<s>"))["input_ids"]


@pytest.mark.parametrize("family", PASSING)
def test_step1_prompt_is_the_familys_own_template_with_the_image_in_its_place(families, engines, wide_png,
                                                                                 street_png, family):
    from transformers import AutoTokenizer

    c, e = families[family], engines[family]
    image_id = AutoTokenizer.from_pretrained(str(c.hf)).convert_tokens_to_ids(IMAGE_TOKEN[family])
    for img in (wide_png, street_png):
        _, entry = image_chunks(e, img)
        n = sum(p.n_tokens for p in entry.chunk.images)
        ours = evaluated_ids(e, img, image_id)
        assert ours == list(_expected_ids(family, c, n)), f"{family} {img.name}"


def test_pixtral_image_sizes_follow_the_image_with_a_break_row_each(engines, wide_png, street_png):
    """Pixtral keeps the aspect ratio (no fixed grid): a w x h merged grid is h rows of w tokens, each row but the
    last followed by the [IMG_BREAK] embedding, so a chunk holds h * (w + 1) - 1 rows."""
    e = engines["mistral3"]
    sizes = []
    for img in (wide_png, street_png):
        _, entry = image_chunks(e, img)
        (chunk,) = entry.chunk.images
        sizes.append(chunk.n_tokens)
        assert chunk.n_pos == chunk.n_tokens
        assert any(chunk.n_tokens == h * (w + 1) - 1 for h in range(1, 65) for w in range(1, 65))
    assert sizes[0] != sizes[1]  # 160x90 vs the street photo: different grids


def _in_child(family: str, body: str) -> None:
    """Runs a proof on a fresh engine in a child process (see ISOLATED)."""
    from conftest import run_python

    from ecso.models.converted import converted_family

    c = converted_family(family)
    code = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from ecso.runtime import Engine, EngineConfig
cfg = EngineConfig(model={str(c.llm)!r}, mmproj={str(c.mmproj)!r}, n_ctx=2048, kv_f32=True, flash_attn=False)
""" + body + "\nprint('PROVEN')\n"
    r = run_python(code, timeout=300)
    assert r.returncode == 0 and "PROVEN" in r.stdout, r.stderr[-1500:]


# Mistral 3's image-dependent proofs run in a fresh process: in one long-lived process that had already run a
# Qwen3-VL engine, the Mistral 3 engine answered differently (wrong) from then on, although its image embeddings and
# text logits stayed identical; the cause was not found (docs/families.md; see the strict xfail below).
ISOLATED = {"mistral3"}


@pytest.mark.parametrize("family", PASSING)
def test_four_steps_reuse_is_bit_exact_and_encodes_once(engines, wide_png, family):
    if family in ISOLATED:
        return _in_child(family, f"""
from support.family_checks import run_forced_unsafe
with Engine(cfg) as e:
    a, b = run_forced_unsafe(e, {str(wide_png)!r}, True), run_forced_unsafe(e, {str(wide_png)!r}, False)
assert [s.name for s in a.steps] == ["answer", "judge", "caption", "regenerate"] and a.unsafe
assert [s.text for s in a.steps] == [s.text for s in b.steps] and a.judge_score == b.judge_score
assert (a.image_encodes, b.image_encodes) == (1, 3) and a.steps[1].reused_positions > 0
""")
    e = engines[family]
    a = _run(e, wide_png, reuse=True)
    b = _run(e, wide_png, reuse=False)
    assert [s.name for s in a.steps] == ["answer", "judge", "caption", "regenerate"] and a.unsafe
    assert [s.text for s in a.steps] == [s.text for s in b.steps]
    assert a.judge_score == b.judge_score
    assert (a.image_encodes, b.image_encodes) == (1, 3)
    if e.kv_rollback:
        assert a.steps[1].reused_positions > 0 and a.steps[2].reused_positions == a.steps[1].reused_positions
    else:  # recurrent state: every step recomputed (the image embeddings still come from the cache)
        assert all(s.reused_positions == 0 for s in a.steps[:3])
    print(f"\n{family}: " + ", ".join(f"{s.name} {s.prompt_positions}/{s.reused_positions}" for s in a.steps))


@pytest.mark.parametrize("family", PASSING)
def test_paper_and_appended_judges_run_with_the_tokenizers_own_yes_no(engines, wide_png, family):
    from support.family_checks import assert_judges_reuse_exactly

    if family in ISOLATED:
        return _in_child(family, f"""
from support.family_checks import assert_judges_reuse_exactly
with Engine(cfg) as e:
    assert_judges_reuse_exactly(e, {str(wide_png)!r})
""")
    assert_judges_reuse_exactly(engines[family], wide_png)


@pytest.mark.parametrize("family", PASSING)
def test_batched_requests_on_a_family_match_the_same_requests_run_alone(families, engines, wide_png, street_png,
                                                                        family):
    from support.family_checks import assert_batched_matches_alone

    c = families[family]
    if family in ISOLATED:
        return _in_child(family, f"""
from support.family_checks import assert_batched_matches_alone
with Engine(cfg) as e:
    assert_batched_matches_alone(e, {str(c.llm)!r}, {str(c.mmproj)!r}, {str(wide_png)!r}, {str(street_png)!r})
""")
    assert_batched_matches_alone(engines[family], c.llm, c.mmproj, wide_png, street_png)


# image embeddings, llama.cpp (clip.cpp) vs transformers' get_image_features, f32, on an image no resize touches
# GLM-4.1V is not compared: for a 112 px image mtmd makes 16 tokens, Glm4vImageProcessor (size pinned) 4.
EMBD_CASES = {"qwen3vl": (128, 1e-2)}


@pytest.mark.parametrize("family", sorted(EMBD_CASES))
def test_image_embeddings_match_transformers(families, engines, tmp_path, family):
    """Qwen3-VL: the main embedding and each deepstack slice of every row (n_embd_inp = 3 x 64) are compared."""
    import torch
    import transformers
    from PIL import Image

    size, tol = EMBD_CASES[family]
    c, e = families[family], engines[family]
    path = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(3).random((size, size, 3)) * 255).astype("uint8")).save(path)
    _, entry = image_chunks(e, path)
    ours = np.concatenate(e._encode(entry)).reshape(-1, e.n_embd_inp)
    model = getattr(transformers, c.architecture).from_pretrained(str(c.hf), dtype=torch.float32).eval()
    proc_cls = transformers.Glm4vImageProcessor if family == "glm4v" else transformers.Qwen2VLImageProcessor
    proc = proc_cls.from_pretrained(str(c.hf), size={"shortest_edge": size * size, "longest_edge": size * size})
    px = proc(images=[Image.open(path).convert("RGB")], return_tensors="pt")
    with torch.no_grad():
        out = model.model.get_image_features(px["pixel_values"], px["image_grid_thw"])
    if family == "qwen3vl":
        main, deepstack = out
        ref = torch.cat([torch.cat(list(main))] + [d for d in deepstack], dim=-1).numpy()
    else:
        ref = torch.cat(list(out)).numpy()
    assert ours.shape == ref.shape
    diff = float(np.abs(ours - ref).max())
    print(f"\n{family}: {ours.shape[0]} image tokens x {ours.shape[1]}, max |embedding diff| {diff:.2e} "
          f"(std {ref.std():.2f})")
    assert diff < tol


# ------------------------------------------------------------------------------------------------ quantized
@pytest.mark.parametrize("family", PASSING + ("qwen2vl", "qwen25vl", "gemma3", "smolvlm"))
def test_q8_0_llm_runs_the_four_steps_with_reuse_bit_exact(families, wide_png, family):
    """The converter's `--outtype q8_0` LLM, converted once per machine beside the cached f32 one."""
    from ecso.models.converted import converted_family, quantized_llm

    c = families[family] if family in families else converted_family(family)
    assert_q8_reuse_exact(quantized_llm(c, "q8_0"), c.mmproj, wide_png)


def test_q8_0_llava_export_runs_the_four_steps_with_reuse_bit_exact(tiny_siglip, tmp_path, wide_png):
    """`ecso export llava --outtype q8_0` (LLaVA-1.5 layout; LLaVA-1.6 shares the LLM side)."""
    from ecso.export.llava_gguf import export_llava

    r = export_llava(tiny_siglip.hf, tmp_path / "q8", outtype="q8_0")
    assert_q8_reuse_exact(r.llm, r.mmproj, wide_png)


@pytest.mark.parametrize("family", PASSING)
def test_ecso_run_answers_with_all_four_steps(families, street_png, family):
    c = families[family]
    out = ecso_run_four_steps(c.llm, c.mmproj, street_png)
    assert out["engine"]["kv_prefix_reuse"].startswith("append-only" if family == "lfm2vl" else "rollback")


# ------------------------------------------------------------------------------------------------ what fails here
def test_llama4_tiny_aborts_in_llama_cpp_on_its_first_image_encode(tmp_path):
    """The tiny Llama 4 converts and loads (text and mmproj), but the first image encode aborts inside llama.cpp
    (`GGML_ASSERT(buf != NULL && "tensor buffer not set")`, ggml-backend.cpp) while mtmd splits the 56 px image
    into 3 x 3 llava-uhd slices. Run in a child process; if this starts passing, Llama 4 can join PASSING."""
    from conftest import run_python

    from ecso.models.converted import converted_family

    c = converted_family("llama4")
    code = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from ecso.runtime import Engine, EngineConfig
from support.family_checks import run_forced_unsafe
e = Engine(EngineConfig(model={str(c.llm)!r}, mmproj={str(c.mmproj)!r}, n_ctx=2048))
print("LOADED", flush=True)
run_forced_unsafe(e, {str(Path(__file__).parent.parent / "examples" / "street.png")!r}, True)
print("RAN", flush=True)
"""
    r = run_python(code, timeout=300)
    assert "LOADED" in r.stdout and "RAN" not in r.stdout
    assert r.returncode != 0 and "tensor buffer not set" in r.stderr


def test_gemma3n_cannot_be_built_here_its_vision_tower_needs_timm():
    """Gemma 3n's vision tower is timm's MobileNetV5 behind transformers' TimmWrapper: without `timm` (not in the
    export extra; it also needs torchvision) transformers cannot build the model, so no tiny checkpoint exists to
    convert. llama.cpp itself has the pieces (conversion/gemma.py, mtmd's models/mobilenetv5.cpp)."""
    import importlib.util

    import transformers

    assert importlib.util.find_spec("timm") is None
    cfg = transformers.Gemma3nConfig()
    with pytest.raises(ImportError, match="timm"):
        transformers.Gemma3nForConditionalGeneration(cfg)


def test_mistral3_answers_as_alone_after_a_qwen3vl_engine_in_the_same_process(families, wide_png):
    """llama.cpp's Pixtral graph "clears" a never-written tensor by scaling it by 0 to make the [IMG_BREAK] rows, so
    NaN bits a Qwen3-VL encoder left in that memory made those rows NaN and Mistral 3 answered nothing. The engine
    restores them from the mmproj's break embedding: the answers equal a fresh process's, bit for bit."""
    import json

    from conftest import run_python

    from ecso.models.converted import quantized_llm

    m, q = families["mistral3"], families["qwen3vl"]
    pairs = {"qwen3vl": (str(quantized_llm(q)), str(q.mmproj)), "mistral3": (str(quantized_llm(m)), str(m.mmproj))}

    def texts_in_one_process(order: list[str]) -> list:
        code = f"""
import json, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from ecso.runtime import Engine, EngineConfig
from support.family_checks import run_forced_unsafe
out = []
for llm, mmproj in {[pairs[f] for f in order]!r}:
    with Engine(EngineConfig(model=llm, mmproj=mmproj, n_ctx=2048)) as e:
        out.append([s.text for s in run_forced_unsafe(e, {str(wide_png)!r}, True).steps])
print("TEXTS", json.dumps(out))
"""
        r = run_python(code, timeout=300)
        line = next(ln for ln in r.stdout.splitlines() if ln.startswith("TEXTS"))
        return json.loads(line[6:])

    (alone,) = texts_in_one_process(["mistral3"])
    _, after = texts_in_one_process(["qwen3vl", "mistral3"])
    assert after == alone


@pytest.mark.parametrize("family", PASSING)
def test_native_engine_gives_the_python_engines_four_steps(families, libecso, wide_png, family):
    """libecso on each 2025 family (q8_0 LLM), first in a fresh process, then the Python engine there: the same
    steps, texts and encodes. libecso alone in a fresh process was where Mistral 3's NaN [IMG_BREAK] rows showed
    (empty answers) before libecso restored them."""
    import json

    from conftest import run_python

    from ecso.models.converted import quantized_llm

    c = families[family]
    code = f"""
import json, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from ecso.runtime import EcsoOptions, Engine, EngineConfig
from ecso.runtime.libecso import NativeEngine
from support.family_checks import QUERY, run_forced_unsafe
cfg = EngineConfig(model={str(quantized_llm(c))!r}, mmproj={str(c.mmproj)!r}, n_ctx=2048)
opts = EcsoOptions(max_tokens=10, caption_max_tokens=10, judge="logit", logit_threshold=0.0)
with NativeEngine(cfg, {str(libecso)!r}) as n:
    nat = n.run({str(wide_png)!r}, QUERY, opts)
with Engine(cfg) as e:
    py = run_forced_unsafe(e, {str(wide_png)!r}, True)
print("OUT", json.dumps([[s["text"] for s in nat["steps"]], [s.text for s in py.steps],
                         [nat["image_encodes"], py.image_encodes], [nat["judge_score"], py.judge_score]]))
"""
    r = run_python(code, timeout=300)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("OUT")), None)
    assert line, r.stderr[-2000:]
    nat_texts, py_texts, encodes, scores = json.loads(line[4:])
    assert nat_texts == py_texts and len(py_texts) == 4 and all(py_texts[:1])
    assert encodes == [1, 1]
    assert scores[0] == pytest.approx(scores[1], abs=1e-9)


def test_guarded_streaming_on_a_recurrent_llm_is_refused_by_both_engines(families, engines, libecso, wide_png):
    """LFM2's state cannot be cut back, so the guard's judge branch could not be rolled back: both engines refuse
    guard_every up front with what to do, and the plain request still runs."""
    from ecso.runtime import EcsoOptions, EngineConfig, InputError
    from ecso.runtime.ecso import run
    from ecso.runtime.libecso import NativeEngine

    e = engines["lfm2vl"]
    assert e.describe()["kv_prefix_reuse"].startswith("append-only")
    opts = EcsoOptions(max_tokens=8, guard_every=4)
    with pytest.raises(InputError, match="guard_every"):
        run(e, str(wide_png), QUERY, opts)
    assert run(e, str(wide_png), QUERY, EcsoOptions(max_tokens=4)).steps[0].name == "answer"
    c = families["lfm2vl"]
    with NativeEngine(EngineConfig(model=str(c.llm), mmproj=str(c.mmproj), n_ctx=2048), libecso) as native:
        assert native.describe()["kv_prefix_reuse"].startswith("append-only")
        with pytest.raises(InputError, match="guard_every"):
            native.run(str(wide_png), QUERY, opts)
        assert native.run(str(wide_png), QUERY, EcsoOptions(max_tokens=4))["steps"][0]["name"] == "answer"
