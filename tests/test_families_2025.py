"""The VLM families of 2025-2026 (Qwen3-VL, ...), proven like the older ones in tests/test_families.py: tiny random
checkpoints built with transformers' own classes, converted by llama.cpp's own converter (cached per machine),
loaded once per session. Measured numbers are printed (pytest -s) and recorded in docs/families.md.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from support.family_checks import QUERY
from support.family_checks import run_forced_unsafe as _run

FAMILIES = ("qwen3vl",)


@pytest.fixture(scope="session")
def families():
    from ecso.models.families import converted_family, smollm2_vocab

    vocab = smollm2_vocab()
    return {f: converted_family(f, vocab_cache=vocab) for f in FAMILIES}


@pytest.fixture(scope="session")
def engines(families):
    """One exact-arithmetic engine per family (f32 KV, flash attention off), shared by the session."""
    from ecso.runtime import Engine, EngineConfig

    out = {f: Engine(EngineConfig(model=str(c.llm), mmproj=str(c.mmproj), n_ctx=2048, kv_f32=True,
                                  flash_attn=False)) for f, c in families.items()}
    yield out
    for e in out.values():
        e.close()


@pytest.fixture(scope="session")
def wide_png(tmp_path_factory) -> Path:
    """A non-square image (160x90)."""
    from PIL import Image

    rgb = (np.random.default_rng(1).random((90, 160, 3)) * 255).astype("uint8")
    path = tmp_path_factory.mktemp("img") / "wide.png"
    Image.fromarray(rgb).save(path)
    return path


def _gguf_value(path: Path, key: str):
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields[key]
    return [field.parts[i].tolist() for i in field.data]


def test_qwen3vl_image_rows_are_n_embd_inp_wide_with_its_deepstack_features(families, engines, street_png):
    """Qwen3-VL's projector emits n_embd x (1 + deepstack layers) floats per image token (the main embedding, then
    one slice per deepstack layer, added to the hidden state of the first LLM layers). The engine must copy, cache
    and feed back rows of that width (`llama_model_n_embd_inp`), not the hidden size: with n_embd-wide copies
    llama.cpp read past the copied buffer and the same request gave different answers from run to run."""
    from ecso.runtime.prompts import Message

    c, e = families["qwen3vl"], engines["qwen3vl"]
    deepstack = sum(bool(v[0]) for v in _gguf_value(c.mmproj, "clip.vision.is_deepstack_layers"))
    (proj_dim,) = _gguf_value(c.mmproj, "clip.vision.projection_dim")[0]
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
