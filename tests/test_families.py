"""VLM families beyond LLaVA-1.5, proven on tiny random checkpoints built with transformers' own classes and
converted by llama.cpp's own converter (the one vendored by llama-cpp-python 0.3.36).

Each family is built + converted once per machine (cache keyed by the builder source and the converter sha256) and
loaded once per session. Measured numbers are printed (pytest -s) and recorded in docs/families.md.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import run_python
from support.family_checks import (QUERY, assert_batched_matches_alone, assert_judges_reuse_exactly,
                                   converted_families, evaluated_ids, exact_engines, wide_image)
from support.family_checks import run_forced_unsafe as _run

FAMILIES = ("qwen2vl", "qwen25vl", "gemma3", "smolvlm")
# llama.cpp vs transformers, f32 weights and KV cache, text-only logits (std ~1.2). Gemma 3's larger diff: its
# embeddings are scaled by sqrt(hidden) before 3 layers of f32 accumulation in a different order (argmax agrees).
LOGIT_TOL = {"qwen2vl": 2e-4, "qwen25vl": 2e-4, "gemma3": 5e-3, "smolvlm": 2e-4}


@pytest.fixture(scope="session")
def converter():
    from ecso.export.llamacpp_convert import converter_dir

    return converter_dir()


@pytest.fixture(scope="session")
def families(converter):
    """Every tiny family converted with the pinned converter (built once per machine, then cached)."""
    return converted_families(FAMILIES)


@pytest.fixture(scope="session")
def engines(families):
    """One exact-arithmetic engine per family (f32 KV, flash attention off), shared by the session."""
    yield from exact_engines(families)


@pytest.fixture(scope="session")
def wide_png(tmp_path_factory) -> Path:
    """A non-square image (160x90): Qwen's grid is not square, SmolVLM splits it into tiles."""
    return wide_image(tmp_path_factory)


def test_converter_is_the_pinned_sdist_unpacked_once(converter):
    from ecso.export.llamacpp_convert import SDIST_SHA256, converter_dir

    assert SDIST_SHA256 in (converter.root / ".complete").read_text()
    assert converter.script.exists() and (converter.gguf_py / "gguf" / "gguf_writer.py").exists()
    assert (converter.root / "conversion" / "qwenvl.py").exists()
    assert converter_dir().root == converter.root  # second call: the cached copy, nothing fetched


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_family_loads_with_its_projector(families, engines, family):
    from gguf import GGUFReader

    expected = {"qwen2vl": "qwen2vl_merger", "qwen25vl": "qwen2.5vl_merger", "gemma3": "gemma3",
                "smolvlm": "idefics3"}[family]
    field = GGUFReader(str(families[family].mmproj)).fields["clip.projector_type"]
    assert bytes(field.parts[field.data[0]]).decode() == expected
    e = engines[family]
    assert e.has_vision and e.chat_format.name == "gguf-template"


@pytest.mark.parametrize("family", FAMILIES)
def test_text_logits_match_transformers(families, engines, family):
    import transformers

    from support.family_checks import assert_hf_text_logits_match

    c = families[family]
    assert_hf_text_logits_match(engines[family], c.hf, getattr(transformers, c.architecture), family,
                                LOGIT_TOL[family])


# image embeddings, llama.cpp (clip.cpp) vs transformers' get_image_features, on an image no resize touches.
# SmolVLM: see test_smolvlm_image_embeddings_match_transformers_modules_with_positions_0_to_n.
EMBD_CASES = {"qwen2vl": (112, 1e-2), "qwen25vl": (224, 1e-2), "gemma3": (56, 5e-3)}


@pytest.mark.parametrize("family", sorted(EMBD_CASES))
def test_image_embeddings_match_transformers(families, engines, tmp_path, family):
    import torch
    import transformers
    from PIL import Image

    from ecso.runtime.prompts import Message

    size, tol = EMBD_CASES[family]
    c, e = families[family], engines[family]
    path = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(3).random((size, size, 3)) * 255).astype("uint8")).save(path)
    prompt, _ = e.build_prompt([Message("user", QUERY)], e.load_image(path))
    ours = np.concatenate(e._encode(next(iter(prompt.images.values())))).reshape(-1, e.n_embd)
    model = getattr(transformers, c.architecture).from_pretrained(str(c.hf), dtype=torch.float32).eval()
    img = Image.open(path).convert("RGB")
    with torch.no_grad():
        if family == "gemma3":
            px = transformers.Gemma3ImageProcessor.from_pretrained(str(c.hf))(images=[img], return_tensors="pt")
            ref = model.model.get_image_features(px["pixel_values"])
        else:  # HF's pixel budget pinned to the image's own size, so both sides see the same patches
            proc = transformers.Qwen2VLImageProcessor.from_pretrained(str(c.hf), min_pixels=size * size,
                                                                      max_pixels=size * size)
            px = proc(images=[img], return_tensors="pt")
            ref = torch.cat(list(model.model.get_image_features(px["pixel_values"], px["image_grid_thw"])))
    ref = ref.reshape(-1, e.n_embd).numpy()
    assert ours.shape == ref.shape
    diff = float(np.abs(ours - ref).max())
    print(f"\n{family}: {ours.shape[0]} image tokens, max |embedding diff| {diff:.2e} (std {ref.std():.2f})")
    assert diff < tol


def test_smolvlm_image_embeddings_match_transformers_modules_with_positions_0_to_n(families, engines, tmp_path):
    """transformers 4.57.6's Idefics3VisionEmbeddings bucketizes `i / n * (1 - 1e-6)`, which puts patch i at
    position i - 1 (patches 0 and 1 share position 0); llama.cpp uses positions 0..n-1 like the original Idefics2/3
    code. With transformers' own modules and positions 0..n-1 the embeddings match; with its forward they differ
    (asserted, so a transformers change is noticed)."""
    import torch
    import transformers
    from PIL import Image

    from ecso.runtime.prompts import Message

    c, e = families["smolvlm"], engines["smolvlm"]
    path = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(3).random((112, 112, 3)) * 255).astype("uint8")).save(path)
    prompt, _ = e.build_prompt([Message("user", QUERY)], e.load_image(path))
    ours = np.stack(e._encode(next(iter(prompt.images.values()))))  # 5 tiles (2x2 + global) x 4 tokens x 64
    model = transformers.Idefics3ForConditionalGeneration.from_pretrained(str(c.hf), dtype=torch.float32).eval()
    px = transformers.Idefics3ImageProcessor.from_pretrained(str(c.hf))(
        images=[Image.open(path).convert("RGB")], return_tensors="pt")["pixel_values"][0]
    vm = model.model.vision_model
    with torch.no_grad():
        tiles_hf = model.model.get_image_features(px[None], torch.ones(1, *px.shape[:1], *px.shape[2:], dtype=torch.bool))
        x = vm.embeddings.patch_embedding(px).flatten(2).transpose(1, 2)
        x = x + vm.embeddings.position_embedding(torch.arange(x.shape[1]))[None]
        x = vm.post_layernorm(vm.encoder(inputs_embeds=x).last_hidden_state)
        tiles_ref = model.model.connector(x)
    # the global image is resized (llama.cpp's resize vs PIL's), so only the four crops are compared
    crops = ours[:4].reshape(4, 4, -1)
    diff = float(np.abs(crops - tiles_ref[:4].numpy()).max())
    hf_diff = float(np.abs(crops - tiles_hf[:4].reshape(4, 4, -1).numpy()).max())
    print(f"\nsmolvlm: 4 tiles, max |embedding diff| {diff:.2e} with positions 0..n-1, {hf_diff:.2f} with "
          f"transformers' forward (std {tiles_ref.std():.2f})")
    assert diff < 1e-2
    assert hf_diff > 0.1


def _expected_ids(family: str, c, engine, image_path: Path) -> list[int]:
    """The family's own prompt for [image, QUERY]: HF chat template + the processor's image expansion, with the
    number of image tokens llama.cpp chose (its resize policy is its own; see docs/families.md)."""
    from transformers import AutoProcessor, AutoTokenizer

    if family == "smolvlm":  # the real processor runs without torchvision
        from PIL import Image

        proc = AutoProcessor.from_pretrained(str(c.hf))
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUERY}]}]
        text = proc.apply_chat_template(msgs, add_generation_prompt=True)
        return proc(text=text, images=[Image.open(image_path).convert("RGB")])["input_ids"][0]
    tok = AutoTokenizer.from_pretrained(str(c.hf))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUERY}]}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    n = _image_tokens(engine, image_path)
    if family in ("qwen2vl", "qwen25vl"):
        text = text.replace("<|image_pad|>", "<|image_pad|>" * n)
    else:  # Gemma3Processor writes "\n\n<start_of_image>...<end_of_image>\n\n"; llama.cpp's mtmd omits the "\n\n"
        text = text.replace("<start_of_image>", "<start_of_image>" + "<image_soft_token>" * n + "<end_of_image>")
    return tok(text, add_special_tokens=False)["input_ids"]


def _image_tokens(engine, image_path: Path) -> int:
    from ecso.runtime.prompts import Message

    prompt, _ = engine.build_prompt([Message("user", QUERY)], engine.load_image(image_path))
    entry = next(iter(prompt.images.values()))
    return sum(p.n_tokens for p in entry.chunk.images)


@pytest.mark.parametrize("family", FAMILIES)
def test_step1_prompt_is_the_familys_own_template_with_the_image_in_its_place(families, engines, wide_png,
                                                                                 street_png, family):
    from transformers import AutoTokenizer

    c, e = families[family], engines[family]
    image_token = {"qwen2vl": "<|image_pad|>", "qwen25vl": "<|image_pad|>", "gemma3": "<image_soft_token>",
                   "smolvlm": "<image>"}[family]
    image_id = AutoTokenizer.from_pretrained(str(c.hf)).convert_tokens_to_ids(image_token)
    for img in (wide_png, street_png):
        ours = evaluated_ids(e, img, image_id)
        assert ours == list(_expected_ids(family, c, e, img)), f"{family} {img.name}"


@pytest.mark.parametrize("family", FAMILIES)
def test_image_positions_are_what_mtmd_reports(engines, wide_png, family):
    """M-RoPE (Qwen) packs a grid into fewer positions than tokens; the others take one position per token.
    The KV bookkeeping must advance by positions, the context budget by tokens."""
    from ecso.runtime.prompts import Message

    e = engines[family]
    prompt, _ = e.build_prompt([Message("user", QUERY)], e.load_image(wide_png))
    entry = next(iter(prompt.images.values()))
    if family in ("qwen2vl", "qwen25vl"):
        (img,) = entry.chunk.images
        assert (img.n_tokens, img.n_pos) == (18, 6)  # 160x90 -> a 3x6 merged grid: 18 tokens over max(3, 6) positions
        assert prompt.n_cells - prompt.n_pos == 12
    else:
        assert entry.n_pos == entry.n_tokens and prompt.n_cells == prompt.n_pos
    if family == "smolvlm":
        assert len(entry.chunk.images) == 5  # 2x2 tiles + the global image


@pytest.mark.parametrize("family", FAMILIES)
def test_four_steps_reuse_is_bit_exact_and_encodes_once(engines, wide_png, family):
    e = engines[family]
    a = _run(e, wide_png, reuse=True)
    b = _run(e, wide_png, reuse=False)
    assert [s.name for s in a.steps] == ["answer", "judge", "caption", "regenerate"] and a.unsafe
    assert [s.text for s in a.steps] == [s.text for s in b.steps]
    assert a.judge_score == b.judge_score
    assert (a.image_encodes, b.image_encodes) == (1, 3)
    judge, caption = a.steps[1], a.steps[2]
    assert judge.reused_positions > 0 and caption.reused_positions == judge.reused_positions  # system + image
    print(f"\n{family}: " + ", ".join(f"{s.name} {s.prompt_positions}/{s.reused_positions}" for s in a.steps))


@pytest.mark.parametrize("family", FAMILIES)
def test_paper_and_appended_judges_run_with_the_tokenizers_own_yes_no(engines, wide_png, family):
    from ecso.runtime.ecso import yes_no_ids

    e = engines[family]
    assert all(e.detokenize([t]).strip().lower() == "yes" for t in yes_no_ids(e)[0])
    assert_judges_reuse_exactly(e, wide_png)


def test_unknown_projector_fails_with_one_line_error_naming_what_is_proven(families, tmp_path):
    """An mmproj whose projector llama.cpp does not know (here: 'idefics3' renamed 'idefixx3')."""
    src = families["smolvlm"]
    bad = tmp_path / "mmproj-unknown.gguf"
    shutil.copy(src.mmproj, bad)
    data = bytearray(bad.read_bytes())
    at = data.find(b"idefics3")
    data[at:at + 8] = b"idefixx3"
    bad.write_bytes(bytes(data))
    code = f"""
from ecso.runtime import Engine, EngineConfig
from ecso.runtime.errors import ModelError
try:
    Engine(EngineConfig(model={str(src.llm)!r}, mmproj={str(bad)!r}, n_ctx=256))
except ModelError as e:
    print("MODEL_ERROR", e)
"""
    r = run_python(code)
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("MODEL_ERROR"))
    assert "idefixx3" in line and "qwen2vl_merger" in line and "gemma3" in line


def test_ecso_bench_runs_on_a_converted_family(families, tmp_path):
    from conftest import run_cli

    c = families["qwen2vl"]
    out = tmp_path / "bench.json"
    r = run_cli("ecso", "bench", "--model", str(c.llm), "--mmproj", str(c.mmproj), "--repeats", "1",
                "--max-tokens", "4", "--json", str(out))
    assert r.returncode == 0, r.stderr[-500:]
    assert json.loads(out.read_text())


def test_export_hf_cli_runs_the_pinned_converter(families, tmp_path):
    """`ecso export hf` writes the same bytes as the converter the tests prove (f32)."""
    import hashlib

    from conftest import run_cli

    c = families["smolvlm"]
    r = run_cli("ecso", "export", "hf", str(c.hf), "--out", str(tmp_path / "out"), "--outtype", "f32")
    assert r.returncode == 0, r.stderr[-500:]
    digest = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()  # noqa: E731
    assert digest(tmp_path / "out" / "llm.gguf") == digest(c.llm)
    assert digest(tmp_path / "out" / "mmproj.gguf") == digest(c.mmproj)
    again = run_cli("ecso", "export", "hf", str(c.hf), "--out", str(tmp_path / "out"))
    assert again.returncode != 0 and "--force" in again.stderr and "Traceback" not in again.stderr


def test_converter_refusal_is_one_line(converter, tmp_path):
    """LLaVA-1.6 (LlavaNextForConditionalGeneration) is not in this converter's table: a clear one-line error."""
    from ecso.export.llamacpp_convert import ConverterError, convert

    hf = tmp_path / "llava-next"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"architectures": ["LlavaNextForConditionalGeneration"],
                                                "model_type": "llava_next", "text_config": {"model_type": "llama"}}))
    with pytest.raises(ConverterError, match="LlavaNextForConditionalGeneration") as err:
        convert(hf, tmp_path / "x.gguf", converter=converter)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_requests_on_a_family_match_the_same_requests_run_alone(families, engines, wide_png, street_png,
                                                                        family):
    """run_many decodes whole image blocks (marker tokens, several tiles, M-RoPE positions) on sequences 1..N:
    each request's steps equal the request run alone on sequence 0 (f32 weights and KV)."""
    c = families[family]
    assert_batched_matches_alone(engines[family], c.llm, c.mmproj, wide_png, street_png)
