"""InternVL (the fifth 2025 family), proven like those of tests/test_families_2025.py: a tiny random transformers
`InternVLForConditionalGeneration` (Qwen2 LLM, SmolLM2's vocabulary), given OpenGVLab's config.json shape for
llama.cpp's converter (`ecso.models.families_internvl`), converted once per machine. Measured numbers are printed
(pytest -s) and recorded in docs/families.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from support.family_checks import (QUERY, assert_q8_reuse_exact, ecso_run_four_steps, evaluated_ids, gguf_value,
                                   image_chunks, wide_image)
from support.family_checks import run_forced_unsafe as _run

FAMILY = "internvl"
LOGIT_TOL = 2e-4  # f32 weights and KV, text-only logits (std ~1)
EMBD_TOL = 1e-2  # f32 image embeddings (std ~1)


@pytest.fixture(scope="session")
def wide_png(tmp_path_factory) -> Path:
    """A non-square image (160x90), the same pixels as the other family tests'."""
    return wide_image(tmp_path_factory)


@pytest.fixture(scope="module")
def internvl():
    from ecso.models.converted import converted_family
    from ecso.models.families_internvl import TRANSFORMERS_DIR

    c = converted_family(FAMILY)
    return c, c.hf / TRANSFORMERS_DIR


@pytest.fixture(scope="module")
def engine(internvl):
    from ecso.runtime import Engine, EngineConfig

    c, _ = internvl
    with Engine(EngineConfig(model=str(c.llm), mmproj=str(c.mmproj), n_ctx=2048, kv_f32=True,
                             flash_attn=False)) as e:
        yield e


def test_internvl_converts_from_the_opengvlab_config_and_loads_with_its_projector(internvl, engine):
    c, hf = internvl
    cfg = json.loads((c.hf / "config.json").read_text())
    assert cfg["architectures"] == ["InternVLChatModel"] and "llm_config" in cfg  # OpenGVLab's shape
    assert json.loads((hf / "config.json").read_text())["architectures"] == ["InternVLForConditionalGeneration"]
    (kind,) = gguf_value(c.mmproj, "clip.projector_type")
    assert bytes(kind).decode() == "internvl"
    assert gguf_value(c.mmproj, "clip.vision.projector.scale_factor") == [[2]]  # 1 / downsample_ratio 0.5
    assert engine.has_vision and engine.chat_format.name == "gguf-template" and engine.kv_rollback


def _expected_ids(hf: Path, n: int) -> list[int]:
    """InternVLProcessor's prompt for [image, QUERY]: the template's `<IMG_CONTEXT>\\n` with the token expanded to
    `<img>` n x `<IMG_CONTEXT>` `</img>`, less the `\\n` after it (see the test below)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUERY}]}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text.count("<IMG_CONTEXT>\n") == 1
    text = text.replace("<IMG_CONTEXT>\n", "<img>" + "<IMG_CONTEXT>" * n + "</img>")
    return tok(text, add_special_tokens=False)["input_ids"]


def test_step1_prompt_is_internvls_template_with_the_image_in_its_place(internvl, engine, wide_png, street_png):
    """Two differences from transformers, both pinned: (1) for an image that is not one tile's size, mtmd encodes
    the one 112 px tile (max_dynamic_patch 1) and then always the overview, 2 x 16 embedding rows in one
    `<img>...</img>` (InternVLProcessor, one patch and no thumbnail: 16); (2) ecso puts
    the image where the template's whole image slot `<IMG_CONTEXT>\\n` was, so the `\\n` after `</img>` is not
    evaluated (the slot finder takes the template's whitespace around an image tag as part of the slot)."""
    from transformers import AutoTokenizer

    c, hf = internvl
    image_id = AutoTokenizer.from_pretrained(str(hf)).convert_tokens_to_ids("<IMG_CONTEXT>")
    for img in (wide_png, street_png):
        _, entry = image_chunks(engine, img)
        sizes = [p.n_tokens for p in entry.chunk.images]
        assert sizes == [16, 16], img.name  # the 112 px tile, then the overview
        assert evaluated_ids(engine, img, image_id) == _expected_ids(hf, sum(sizes)), img.name


def test_four_steps_reuse_is_bit_exact_and_encodes_once(engine, wide_png):
    a, b = _run(engine, wide_png, reuse=True), _run(engine, wide_png, reuse=False)
    assert [s.name for s in a.steps] == ["answer", "judge", "caption", "regenerate"] and a.unsafe
    assert [s.text for s in a.steps] == [s.text for s in b.steps] and a.judge_score == b.judge_score
    assert all(a.steps[i].text for i in (0, 2, 3))
    assert (a.image_encodes, b.image_encodes) == (1, 3)
    assert a.steps[1].reused_positions > 0 and a.steps[2].reused_positions == a.steps[1].reused_positions
    print(f"\n{FAMILY}: " + ", ".join(f"{s.name} {s.prompt_positions}/{s.reused_positions}" for s in a.steps))


def test_paper_and_appended_judges_run_with_the_tokenizers_own_yes_no(engine, wide_png):
    from support.family_checks import assert_judges_reuse_exactly

    assert_judges_reuse_exactly(engine, wide_png)


def test_batched_requests_match_the_same_requests_run_alone(internvl, engine, wide_png, street_png):
    from support.family_checks import assert_batched_matches_alone

    c, _ = internvl
    assert_batched_matches_alone(engine, c.llm, c.mmproj, wide_png, street_png)


def test_text_logits_match_transformers(internvl, engine):
    import transformers

    from support.family_checks import assert_hf_text_logits_match

    _, hf = internvl
    assert_hf_text_logits_match(engine, hf, transformers.InternVLForConditionalGeneration, FAMILY, LOGIT_TOL)


def test_image_embeddings_match_transformers_with_llama_cpps_cls_position_rows(internvl, engine, tmp_path):
    """A 112 px image (exactly one tile: mtmd encodes only its overview, no resize) against transformers'
    `get_image_features` (tower, CLS dropped, pixel shuffle 0.5, mlp1 projector), pixels normalized with the
    mmproj's image_mean / image_std.

    llama.cpp's InternVL graph (mtmd models/internvl.cpp) appends the CLS token after the patches and then adds the
    position embeddings in stored order: patch i gets row i and CLS the last row, where transformers (and
    OpenGVLab's code) put CLS first, so patch i gets row i + 1 and CLS row 0. With transformers' position rows
    rotated the same way the embeddings agree to f32 precision; as stored they differ by ~0.2 (std 1.4) on these
    random rows. Both are pinned: if llama.cpp changes its order, the second assertion says so."""
    import torch
    import transformers
    from PIL import Image

    from ecso.models.families_internvl import IMAGE_SIZE

    _, hf = internvl
    rgb = (np.random.default_rng(3).random((IMAGE_SIZE, IMAGE_SIZE, 3)) * 255).astype("uint8")
    path = tmp_path / "img.png"
    Image.fromarray(rgb).save(path)
    _, entry = image_chunks(engine, path)
    assert [p.n_tokens for p in entry.chunk.images] == [16]  # one tile's size: the overview only, no slices
    (ours,) = (e.reshape(-1, engine.n_embd) for e in engine._encode(entry))
    model = transformers.InternVLForConditionalGeneration.from_pretrained(str(hf), dtype=torch.float32).eval()
    proc = json.loads((hf / "preprocessor_config.json").read_text())
    mean, std = (np.array(proc[k], dtype=np.float32) for k in ("image_mean", "image_std"))
    assert np.allclose(mean, [v[0] for v in gguf_value(internvl[0].mmproj, "clip.vision.image_mean")])
    px = torch.from_numpy(((rgb.astype(np.float32) / 255 - mean) / std).transpose(2, 0, 1)[None].copy())

    def features():
        with torch.no_grad():
            return model.model.get_image_features(px, vision_feature_layer=-1,
                                                  vision_feature_select_strategy="default")[0].numpy()

    as_stored = features()
    pos = model.model.vision_tower.embeddings.position_embeddings
    with torch.no_grad():  # CLS's row last, patch i on row i: llama.cpp's order
        pos.copy_(torch.cat([pos[:, -1:], pos[:, :-1]], dim=1))
    rotated = features()
    assert ours.shape == rotated.shape == (16, engine.n_embd)
    diff, diff_stored = float(np.abs(ours - rotated).max()), float(np.abs(ours - as_stored).max())
    print(f"\n{FAMILY}: {ours.shape[0]} image tokens x {ours.shape[1]}, max |embedding diff| {diff:.2e} with "
          f"llama.cpp's position rows, {diff_stored:.2e} as stored (std {as_stored.std():.2f})")
    assert diff < EMBD_TOL
    assert diff_stored > 10 * EMBD_TOL


def test_q8_0_llm_runs_the_four_steps_with_reuse_bit_exact(internvl, wide_png):
    from ecso.models.converted import quantized_llm

    c, _ = internvl
    assert_q8_reuse_exact(quantized_llm(c, "q8_0"), c.mmproj, wide_png)


def test_ecso_run_answers_with_all_four_steps(internvl, street_png):
    c, _ = internvl
    out = ecso_run_four_steps(c.llm, c.mmproj, street_png)
    assert out["engine"]["kv_prefix_reuse"].startswith("rollback")
