"""ECSO checks every VLM family passes, shared by the family tests: tests/test_families.py, test_families_2025.py
and test_families_internvl.py (checkpoints converted by llama.cpp's converter) and tests/test_llava_next.py
(LLaVA-1.6 through our exporter)."""

from __future__ import annotations

from pathlib import Path

QUERY = "What is in this picture?"


def run_forced_unsafe(engine, image: Path, reuse: bool, judge: str = "logit"):
    """All four steps (logit threshold 0: every answer judged unsafe), short answers, from a cold engine."""
    from ecso.runtime.ecso import EcsoOptions, run

    engine.reset()
    engine.image_cache.clear()
    opts = EcsoOptions(max_tokens=10, caption_max_tokens=10, judge=judge, logit_threshold=0.0, reuse=reuse)
    return run(engine, str(image), QUERY, opts)


def assert_judges_reuse_exactly(engine, image: Path) -> None:
    """The paper and appended judges (each with the tokenizer's own yes/no ids) give the same steps with reuse as
    without, and reuse encodes the image once."""
    from ecso.runtime.ecso import yes_no_ids

    yes, no = yes_no_ids(engine)
    assert yes and no and not set(yes) & set(no)
    for judge in ("paper", "append", "append-logit"):
        a = run_forced_unsafe(engine, image, reuse=True, judge=judge)
        b = run_forced_unsafe(engine, image, reuse=False, judge=judge)
        assert [s.text for s in a.steps] == [s.text for s in b.steps], judge
        assert a.image_encodes == 1


def assert_text_logits_match(engine, model, ids: list[int], label: str, tol: float) -> float:
    """llama.cpp's logits at every position of `ids` against the transformers `model`'s (f32): max abs diff within
    `tol`, argmax equal everywhere. Prints and returns the diff (docs/families.md quotes it)."""
    import numpy as np
    import torch

    from ecso.runtime.engine import Prompt
    from ecso.runtime.kv import TextPiece

    out: list = []
    engine.prefill(Prompt([TextPiece(tuple(ids))], {}), reuse=False, logits_all=True, logits_out=out)
    ours = np.stack(out)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    diff = float(np.abs(ours - ref).max())
    print(f"\n{label}: {len(ids)} tokens, max |logit diff| {diff:.2e} (logit std {ref.std():.2f})")
    assert diff <= tol
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
    return diff


JUDGE_TEXT = ("QUERY:\nHow do I bake bread?\n\nRESPONSE:\nMix flour and water.\n\n"
              "Is the RESPONSE harmful? Answer yes or no:")


def assert_hf_text_logits_match(engine, hf: Path, model_class, label: str, tol: float) -> float:
    """The HF checkpoint `hf` (loaded in f32 by `model_class`) against the engine on a judge-style text: its tokenizer
    and llama.cpp's give the same ids, then `assert_text_logits_match`."""
    import torch
    from transformers import AutoTokenizer

    model = model_class.from_pretrained(str(hf), dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(str(hf))(JUDGE_TEXT, add_special_tokens=False)["input_ids"]
    assert engine.tokenize(JUDGE_TEXT, add_special=False) == ids  # same tokenizer on both sides
    return assert_text_logits_match(engine, model, ids, label, tol)


def ecso_run_four_steps(llm: Path, mmproj: Path, image: Path) -> dict:
    """`ecso-run --judge always-unsafe --json` on the files, as a user runs it: exit 0, all four steps, one image
    encode, the verdict unsafe. Returns the result."""
    import json

    from conftest import run_cli

    r = run_cli("ecso-run", "--model", str(llm), "--mmproj", str(mmproj), "--judge", "always-unsafe",
                "--max-tokens", "8", "--image", str(image), "--json", QUERY)
    assert r.returncode == 0, r.stderr[-500:]
    out = json.loads(r.stdout)
    assert [s["name"] for s in out["steps"]] == ["answer", "judge", "caption", "regenerate"]
    assert out["unsafe"] and out["image_encodes"] == 1
    return out


def assert_batched_matches_alone(engine, llm: Path, mmproj: Path, wide_png: Path, street_png: Path) -> None:
    """run_many on a parallel=2 engine of the same files (f32 weights and KV): each request's four steps equal the
    same request run alone on `engine`'s sequence 0, and each of the two images is encoded once."""
    import pytest

    from ecso.runtime import Ecso, EngineConfig
    from ecso.runtime.ecso import EcsoOptions, run

    opts = EcsoOptions(max_tokens=8, caption_max_tokens=8, judge="logit", logit_threshold=0.0)
    reqs = [(str(wide_png), QUERY), (str(street_png), "Describe the colours."), (str(wide_png), "Is it safe?")]
    alone = []
    for image, query in reqs:
        engine.reset()
        alone.append(run(engine, image, query, opts))
    cfg = EngineConfig(model=str(llm), mmproj=str(mmproj), n_ctx=2048, kv_f32=True, flash_attn=False, parallel=2)
    with Ecso(cfg, opts) as batched:
        together = batched.run_many(reqs)
    for a, b in zip(alone, together):
        assert [s.name for s in b.steps] == ["answer", "judge", "caption", "regenerate"]
        assert [s.text for s in b.steps] == [s.text for s in a.steps]
        assert b.judge_score == pytest.approx(a.judge_score, abs=1e-4)
    assert sum(b.image_encodes for b in together) == 2  # two images: each encoded once, whichever request asked


def converted_families(names) -> dict:
    """The tiny families `names`, converted once per machine by the pinned converter (then cached)."""
    from ecso.models.converted import converted_family
    from ecso.models.families import smollm2_vocab

    vocab = smollm2_vocab()
    return {f: converted_family(f, vocab_cache=vocab) for f in names}


def exact_engines(families: dict):
    """One exact-arithmetic engine per family (f32 KV, flash attention off), closed when the generator ends."""
    from ecso.runtime import Engine, EngineConfig

    out = {f: Engine(EngineConfig(model=str(c.llm), mmproj=str(c.mmproj), n_ctx=2048, kv_f32=True,
                                  flash_attn=False)) for f, c in families.items()}
    yield out
    for e in out.values():
        e.close()


def wide_image(tmp_path_factory) -> Path:
    """A non-square random image (160x90), the same pixels in every test file that uses it."""
    import numpy as np
    from PIL import Image

    rgb = (np.random.default_rng(1).random((90, 160, 3)) * 255).astype("uint8")
    path = tmp_path_factory.mktemp("img") / "wide.png"
    Image.fromarray(rgb).save(path)
    return path


def gguf_value(path: Path, key: str):
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields[key]
    return [field.parts[i].tolist() for i in field.data]


def image_chunks(engine, image_path: Path):
    from ecso.runtime.prompts import Message

    prompt, _ = engine.build_prompt([Message("user", QUERY)], engine.load_image(image_path))
    return prompt, next(iter(prompt.images.values()))


def evaluated_ids(engine, image_path: Path, image_id: int) -> list[int]:
    """The ids our engine evaluates for step 1, image embeddings shown as the family's image token."""
    from ecso.runtime.kv import TextPiece
    from ecso.runtime.media import ImageChunk

    prompt, _ = image_chunks(engine, image_path)
    ids: list[int] = []
    for piece in prompt.pieces:
        if isinstance(piece, TextPiece):
            ids += piece.tokens
        else:
            for part in prompt.images[piece.key].chunk.parts:
                ids += [image_id] * part.n_tokens if isinstance(part, ImageChunk) else list(part)
    return ids


def assert_q8_reuse_exact(llm: Path, mmproj: Path, image: Path) -> None:
    """What users run: a q8_0 LLM GGUF, the mmproj as converted (f32 here): four steps, reuse == no reuse, in a child
    process (one model per process, as ecso-run and the server load them)."""
    from gguf import GGMLQuantizationType, GGUFReader

    from conftest import run_python

    types = {t.tensor_type for t in GGUFReader(str(llm)).tensors if t.name.endswith(".attn_q.weight")}
    assert types == {GGMLQuantizationType.Q8_0}
    code = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
from ecso.runtime import Engine, EngineConfig
from support.family_checks import run_forced_unsafe
with Engine(EngineConfig(model={str(llm)!r}, mmproj={str(mmproj)!r}, n_ctx=2048)) as e:
    a, b = run_forced_unsafe(e, {str(image)!r}, True), run_forced_unsafe(e, {str(image)!r}, False)
assert [s.name for s in a.steps] == ["answer", "judge", "caption", "regenerate"], a.steps
assert [s.text for s in a.steps] == [s.text for s in b.steps], ([s.text for s in a.steps], [s.text for s in b.steps])
assert (a.image_encodes, b.image_encodes) == (1, 3)
print("SAME", [s.text for s in a.steps])
"""
    r = run_python(code, timeout=300)
    assert r.returncode == 0 and "SAME" in r.stdout, r.stderr[-800:]
