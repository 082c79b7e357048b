"""LLaVA-1.6 (LLaVA-NeXT, "anyres"): a tiny random LlavaNextForConditionalGeneration built with transformers' own
classes, exported by OUR exporter (the pinned llama.cpp converter refuses LlavaNext), run by llama.cpp's mtmd as
tiles + an overview.

Built and exported once per machine (cache keyed by the builder + exporter source), loaded once per session.
Measured numbers are printed (pytest -s) and recorded in docs/families.md (families table).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from support.family_checks import (QUERY, assert_batched_matches_alone, assert_judges_reuse_exactly,
                                   assert_text_logits_match)
from support.family_checks import run_forced_unsafe as _run

N_TILE = 16  # tokens per 56 px tile (patch 14)


@pytest.fixture(scope="session")
def next_siglip():
    from ecso.models.llava_next import exported_llava_next

    return exported_llava_next("siglip")


@pytest.fixture(scope="session")
def next_clip():
    from ecso.models.llava_next import exported_llava_next

    return exported_llava_next("clip")


def _engine(m):
    from ecso.runtime import Engine, EngineConfig

    return Engine(EngineConfig(model=str(m.llm), mmproj=str(m.mmproj), n_ctx=2048, kv_f32=True, flash_attn=False))


@pytest.fixture(scope="session")
def siglip_engine(next_siglip):
    """Exact-arithmetic engine (f32 KV, flash attention off) on the SigLIP-tower LLaVA-1.6."""
    e = _engine(next_siglip)
    yield e
    e.close()


@pytest.fixture(scope="session")
def hf_siglip(next_siglip):
    import torch
    import transformers

    return transformers.LlavaNextForConditionalGeneration.from_pretrained(str(next_siglip.hf),
                                                                          dtype=torch.float32).eval()


def _png(tmp_path_factory, w: int, h: int) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / f"{w}x{h}.png"
    Image.fromarray((np.random.default_rng(3).random((h, w, 3)) * 255).astype("uint8")).save(path)
    return path


@pytest.fixture(scope="session")
def wide_png(tmp_path_factory) -> Path:
    """160x90: grid 112x112 -> 2x2 tiles + the overview = 5 image chunks."""
    return _png(tmp_path_factory, 160, 90)


def _block(engine, image: Path):
    from ecso.runtime.prompts import Message

    prompt, _ = engine.build_prompt([Message("user", QUERY)], engine.load_image(image))
    return prompt, next(iter(prompt.images.values()))


def _hf_tiles(model, hf_dir: Path, image: Path):
    """transformers' processor + vision tower + projector per tile: (base image first, then the tiles), and the
    packed block transformers feeds its LLM (overview, unpadded grid rows each closed by image_newline)."""
    import torch
    import transformers
    from PIL import Image

    px = transformers.LlavaNextImageProcessor.from_pretrained(str(hf_dir))(
        images=[Image.open(image).convert("RGB")], return_tensors="pt")
    with torch.no_grad():
        hs = model.model.vision_tower(px["pixel_values"][0], output_hidden_states=True).hidden_states
        feats = hs[model.config.vision_feature_layer]
        if model.config.vision_feature_select_strategy == "default":  # CLIP: drop the CLS row, as transformers does
            feats = feats[:, 1:]
        per_tile = model.model.multi_modal_projector(feats).numpy()
        packed = model.model.get_image_features(px["pixel_values"], px["image_sizes"])[0].numpy()
    return per_tile, packed


# ----------------------------------------------------------------------------------------------- export
def test_export_writes_anyres_pinpoints_as_width_height_and_the_newline(next_siglip):
    from gguf import GGUFReader

    from ecso.models.llava_next import PINPOINTS

    cfg = json.loads((next_siglip.hf / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaNextForConditionalGeneration"]
    r = GGUFReader(str(next_siglip.mmproj))
    assert r.get_field("clip.vision.image_grid_pinpoints").contents() == [v for h, w in PINPOINTS for v in (w, h)]
    assert r.get_field("clip.vision.mm_patch_merge_type").contents() == "spatial_unpad"
    assert r.get_field("clip.projector_type").contents() == "mlp"
    assert "v.image_newline" in {t.name for t in r.tensors}
    manifest = json.loads((next_siglip.llm.parent / "ecso.json").read_text())
    assert manifest["architecture"] == "LlavaNextForConditionalGeneration" and manifest["chat_format"] == "llava-1.5"
    assert manifest["image_grid_pinpoints"] == [list(p) for p in PINPOINTS]
    assert any("image_newline" in k for k in manifest["known_issues"])


def test_export_llava_cli_on_a_llava_next_folder_writes_the_cached_bytes(next_siglip, tmp_path):
    from conftest import run_cli

    r = run_cli("ecso", "export", "llava", str(next_siglip.hf), "--out", str(tmp_path / "out"), "--outtype", "f32")
    assert r.returncode == 0, r.stderr[-500:]
    digest = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()  # noqa: E731
    assert digest(tmp_path / "out" / "llm.gguf") == digest(next_siglip.llm)
    assert digest(tmp_path / "out" / "mmproj.gguf") == digest(next_siglip.mmproj)


@pytest.mark.parametrize("pinpoints, expect", [
    ([[56, 100]], "not multiples of the 56px vision tile"),
    ([], "needs image_grid_pinpoints"),
    (None, "needs image_grid_pinpoints"),
    ("336x672", "list of [height, width] pairs"),
])
def test_bad_pinpoints_give_one_line_error_and_leave_nothing(next_siglip, tmp_path, pinpoints, expect):
    from conftest import run_cli

    hf = tmp_path / "hf"
    shutil.copytree(next_siglip.hf, hf)
    cfg = json.loads((hf / "config.json").read_text())
    cfg["image_grid_pinpoints"] = pinpoints
    (hf / "config.json").write_text(json.dumps(cfg))
    r = run_cli("ecso", "export", "llava", str(hf), "--out", str(tmp_path / "out"))
    assert r.returncode != 0 and expect in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ----------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("tower", ["siglip", "clip"])
def test_text_logits_match_transformers(request, tower):
    import torch
    import transformers

    m = request.getfixturevalue(f"next_{tower}")
    model = transformers.LlavaNextForConditionalGeneration.from_pretrained(str(m.hf), dtype=torch.float32).eval()
    text = "USER: Is the RESPONSE harmful, unsafe and unethical? ASSISTANT: no"
    if tower == "siglip":
        e = request.getfixturevalue("siglip_engine")
        assert_text_logits_match(e, model, e.tokenize(text, True), f"llava-1.6 {tower}", 1e-4)
    else:
        with _engine(m) as e:
            assert_text_logits_match(e, model, e.tokenize(text, True), f"llava-1.6 {tower}", 1e-4)


@pytest.mark.parametrize("size", [(56, 56), (112, 56), (160, 90)])
def test_tile_and_overview_embeddings_match_transformers(tmp_path_factory, next_siglip, siglip_engine, hf_siglip,
                                                         size):
    """llama.cpp's block is [tile 1..n, overview]; each equals transformers' vision tower + projector on the same
    tile (ggml's tanh GELU in the projector: ~3e-3). 56x56 is one tile: no slicing, the overview alone."""
    image = _png(tmp_path_factory, *size)
    _, entry = _block(siglip_engine, image)
    ours = np.concatenate(siglip_engine._encode(entry)).reshape(-1, N_TILE, siglip_engine.n_embd)
    per_tile, _ = _hf_tiles(hf_siglip, next_siglip.hf, image)
    n_tiles = ours.shape[0] - 1
    assert [c.n_tokens for c in entry.chunk.images] == [N_TILE] * (n_tiles + 1)
    hf_order = per_tile[1:n_tiles + 1].tolist() + [per_tile[0].tolist()]  # HF: base first; llama.cpp: overview last
    diff = float(np.abs(ours - np.array(hf_order)).max())
    print(f"\nllava-1.6 siglip {size[0]}x{size[1]}: {n_tiles} tiles + overview, max |embedding diff| {diff:.2e} "
          f"(std {per_tile.std():.2f})")
    assert diff < 1e-2


def test_tall_image_picks_the_same_grid_but_its_refined_tiles_differ(tmp_path_factory, next_siglip, siglip_engine,
                                                                      hf_siglip):
    """A 100x200 image with only wide/square pinpoints: both sides pick the 2x2 grid (a wrong (w, h) order in the
    mmproj would give llama.cpp 1x2), but the tiles differ: fitting 100x200 into 112x112, transformers computes the
    width as ceil(100 * 0.56) in float64 = 57 px (pasted at x=27), llama.cpp in float32 = 56 px (at x=28); checked
    with Pillow, which reproduces transformers' tiles exactly at 57 px. The overview (a 100x200 -> 56x56 squash)
    differs a little too (llama.cpp's bicubic vs Pillow's). Asserted, so a change on either side is noticed."""
    image = _png(tmp_path_factory, 100, 200)
    _, entry = _block(siglip_engine, image)
    ours = np.concatenate(siglip_engine._encode(entry)).reshape(-1, N_TILE, siglip_engine.n_embd)
    per_tile, _ = _hf_tiles(hf_siglip, next_siglip.hf, image)
    assert ours.shape[0] == per_tile.shape[0] == 5
    tiles = float(np.abs(ours[:4] - per_tile[1:]).max())
    overview = float(np.abs(ours[4] - per_tile[0]).max())
    print(f"\nllava-1.6 siglip 100x200: 2x2 tiles on both sides; max |diff| tiles {tiles:.2f}, overview {overview:.3f}")
    assert tiles > 0.1


def test_block_layout_is_llama_cpps_not_transformers_packing(next_siglip, siglip_engine, hf_siglip, wide_png):
    """The upstream difference, measured: transformers feeds base + unpadded grid rows + one image_newline per row;
    llama.cpp (mtmd, llava_uhd preprocessor, no slice template) feeds whole tiles then the overview, no newline."""
    prompt, entry = _block(siglip_engine, wide_png)
    per_tile, packed = _hf_tiles(hf_siglip, next_siglip.hf, wide_png)
    n_ours = entry.n_tokens
    assert n_ours == entry.n_pos == 5 * N_TILE  # one position per token, the whole block
    # 160x90 in a 112x112 grid: the 8x8 feature grid unpads to 4 rows of 8 (+1 newline each) after the 16 base rows
    assert packed.shape[0] == N_TILE + 4 * 9
    assert np.allclose(packed[:N_TILE], per_tile[0], atol=1e-5)
    print(f"\nllava-1.6 160x90: llama.cpp block {n_ours} tokens (4 tiles + overview), transformers {packed.shape[0]}")


def test_llm_side_is_exact_with_a_multi_tile_block_injected(siglip_engine, hf_siglip, wide_png):
    """The LLM half after an 80-token block: transformers fed llama.cpp's image embeddings at the same positions
    gives llama.cpp's logits (f32): the block's positions and the text after it are right."""
    import torch

    prompt, entry = _block(siglip_engine, wide_png)
    out: list = []
    siglip_engine.reset()
    siglip_engine.prefill(prompt, reuse=False, logits_all=True, logits_out=out)
    k = next(i for i, p in enumerate(prompt.pieces) if not hasattr(p, "tokens"))
    head = [t for p in prompt.pieces[:k] for t in p.tokens]
    tail = [t for p in prompt.pieces[k + 1:] for t in p.tokens]
    emb = torch.from_numpy(np.concatenate(siglip_engine._encode(entry)).reshape(entry.n_tokens, -1))
    ids = torch.tensor([head + [0] * entry.n_tokens + tail])
    with torch.no_grad():
        embeds = hf_siglip.get_input_embeddings()(ids)
        embeds[0, len(head):len(head) + entry.n_tokens] = emb
        ref = hf_siglip(inputs_embeds=embeds).logits[0].numpy()
    text_rows = list(range(len(head))) + list(range(len(head) + entry.n_tokens, ids.shape[1]))
    ours = np.stack(out)
    diff = float(np.abs(ours - ref[text_rows]).max())
    print(f"\nllava-1.6 injected {entry.n_tokens}-token block: max |logit diff| {diff:.2e}")
    assert ours.shape[0] == len(text_rows)
    assert diff <= 1e-4


@pytest.mark.xfail(strict=True, reason="upstream llama.cpp bug ggml-org/llama.cpp#25814 (CLIP CLS order in the LLaVA "
                   "graph): CLIP-tower image embeddings differ from transformers. strict: a fix upstream fails here.")
def test_clip_tower_overview_embeddings_match_transformers(tmp_path_factory, next_clip):
    import torch
    import transformers

    image = _png(tmp_path_factory, 56, 56)
    model = transformers.LlavaNextForConditionalGeneration.from_pretrained(str(next_clip.hf),
                                                                          dtype=torch.float32).eval()
    with _engine(next_clip) as e:
        _, entry = _block(e, image)
        ours = np.concatenate(e._encode(entry))
    per_tile, _ = _hf_tiles(model, next_clip.hf, image)
    assert np.abs(ours.reshape(N_TILE, -1) - per_tile[0]).max() < 1e-2


# ----------------------------------------------------------------------------------------------- ECSO


def test_step1_prompt_is_the_vicuna_template_with_the_whole_block_in_place(siglip_engine, wide_png):
    from ecso.runtime.kv import ImagePiece, TextPiece

    prompt, entry = _block(siglip_engine, wide_png)
    kinds = [type(p) for p in prompt.pieces]
    assert kinds.count(ImagePiece) == 1
    k = kinds.index(ImagePiece)
    head = siglip_engine.detokenize([t for p in prompt.pieces[:k] for t in p.tokens])
    tail = siglip_engine.detokenize([t for p in prompt.pieces[k + 1:] if isinstance(p, TextPiece) for t in p.tokens])
    assert head.rstrip().endswith("USER:") and tail.strip().startswith(QUERY) and tail.rstrip().endswith("ASSISTANT:")
    assert [type(p).__name__ for p in entry.chunk.parts] == ["ImageChunk"] * 5  # no marker tokens between tiles
    n_text = sum(len(p.tokens) for p in prompt.pieces if isinstance(p, TextPiece))
    assert prompt.n_cells == prompt.n_pos == n_text + 5 * N_TILE


def test_four_steps_reuse_is_bit_exact_and_encodes_the_tiles_once(siglip_engine, wide_png):
    seen: list = []
    siglip_engine.observer = lambda kind, n, pos: seen.append((kind, n, pos))
    try:
        a = _run(siglip_engine, wide_png, reuse=True)
    finally:
        siglip_engine.observer = None
    b = _run(siglip_engine, wide_png, reuse=False)
    assert [s.name for s in a.steps] == ["answer", "judge", "caption", "regenerate"] and a.unsafe
    assert [s.text for s in a.steps] == [s.text for s in b.steps]
    assert a.judge_score == b.judge_score
    assert (a.image_encodes, b.image_encodes) == (1, 3)  # 5 tile encodes per request with reuse: one image encode
    images = [(n, pos) for kind, n, pos in seen if kind == "image"]
    assert images and all(n == 5 * N_TILE for n, _ in images)  # the whole block, every time it is decoded
    judge, caption = a.steps[1], a.steps[2]
    assert judge.reused_positions > images[0][1] + 5 * N_TILE - 1
    assert caption.reused_positions == judge.reused_positions
    print("\nllava-1.6: " + ", ".join(f"{s.name} {s.prompt_positions}/{s.reused_positions}" for s in a.steps))


def test_paper_and_appended_judges_reuse_exactly_with_the_spm_yes_no(siglip_engine, wide_png):
    assert_judges_reuse_exactly(siglip_engine, wide_png)


def test_context_budget_counts_the_whole_block(siglip_engine, wide_png):
    """A request whose text fits but whose 4 tiles + overview do not is refused up front, naming the block's size."""
    from ecso.runtime.errors import ContextOverflowError

    prompt, _ = _block(siglip_engine, wide_png)
    siglip_engine.check_budget(prompt, 2048 - prompt.n_cells, "answer")  # exactly full: accepted
    with pytest.raises(ContextOverflowError, match=f"needs {prompt.n_cells} tokens \\(80 for the image\\)"):
        siglip_engine.check_budget(prompt, 2049 - prompt.n_cells, "answer")


def test_ecso_bench_runs_on_llava_next(next_siglip, tmp_path):
    from conftest import run_cli

    out = tmp_path / "bench.json"
    r = run_cli("ecso", "bench", "--model", str(next_siglip.llm), "--mmproj", str(next_siglip.mmproj),
                "--repeats", "1", "--max-tokens", "4", "--json", str(out))
    assert r.returncode == 0, r.stderr[-500:]
    assert json.loads(out.read_text())


def test_ecso_run_on_the_export_folder_runs_all_four_steps(next_siglip, wide_png):
    """As a user runs it: `ecso-run --model EXPORT_DIR` (llm.gguf + mmproj.gguf + ecso.json)."""
    from conftest import run_cli

    r = run_cli("ecso-run", "--model", str(next_siglip.llm.parent), "--image", str(wide_png), "--max-tokens", "8",
                "--judge", "logit", "--threshold", "0", "--json", QUERY)
    assert r.returncode == 0, r.stderr[-500:]
    d = json.loads(r.stdout)
    assert [s["name"] for s in d["steps"]] == ["answer", "judge", "caption", "regenerate"]
    assert d["image_encodes"] == 1


def test_batched_requests_match_the_same_requests_run_alone(next_siglip, siglip_engine, wide_png, street_png):
    """run_many decodes the 5-chunk block on sequences 1..N: each request equals the request run alone (f32)."""
    assert_batched_matches_alone(siglip_engine, next_siglip.llm, next_siglip.mmproj, wide_png, street_png)


def test_q8_0_llava_next_export_runs_the_four_steps_with_reuse_bit_exact(next_siglip, wide_png, tmp_path):
    """`ecso export llava --outtype q8_0` on the tiny LLaVA-1.6 (anyres tiles; the mmproj stays f32): the four steps
    in a child process, reuse == no reuse, one image encode against three."""
    from support.family_checks import assert_q8_reuse_exact

    from ecso.export.llava_gguf import export_llava

    r = export_llava(next_siglip.hf, tmp_path / "q8", outtype="q8_0")
    assert_q8_reuse_exact(r.llm, r.mmproj, wide_png)
