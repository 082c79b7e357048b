"""The exporter: tiny LLaVA -> GGUF pair, proven by read-back and by logits parity with transformers."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import run_cli

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _hf_model(path):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()


def _pixel_values(rgb: np.ndarray, mean, std) -> "torch.Tensor":
    x = (rgb.astype(np.float32) / 255.0 - np.array(mean, np.float32)) / np.array(std, np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1)[None].copy())


def _test_image(size: int = 56) -> np.ndarray:
    rng = np.random.Generator(np.random.PCG64(7))
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_tiny_model_rebuilds_byte_identical(tmp_path, tiny):
    from ecso.export.llava_gguf import export_llava
    from ecso.models.tiny import TinyShape, build_tiny_llava, sha256_dir

    again = build_tiny_llava(tmp_path / "hf", TinyShape(tower="clip"))
    assert sha256_dir(again) == sha256_dir(tiny.hf)
    r = export_llava(again, tmp_path / "gguf", outtype="f32")
    assert r.llm.read_bytes() == tiny.llm.read_bytes()
    assert r.mmproj.read_bytes() == tiny.mmproj.read_bytes()


def test_gguf_metadata_reads_back(tiny):
    import gguf

    llm = gguf.GGUFReader(str(tiny.llm))
    assert llm.get_field("general.architecture").contents() == "llama"
    assert llm.get_field("llama.embedding_length").contents() == 64
    assert llm.get_field("tokenizer.ggml.model").contents() == "llama"
    assert "ASSISTANT" in llm.get_field("tokenizer.chat_template").contents()
    assert len(llm.tensors) == 3 + 9 * 2
    mm = gguf.GGUFReader(str(tiny.mmproj))
    assert mm.get_field("general.architecture").contents() == "clip"
    assert mm.get_field("clip.projector_type").contents() == "mlp"
    assert mm.get_field("clip.vision.projection_dim").contents() == 64
    assert list(mm.get_field("clip.vision.feature_layer").contents()) == [2]  # 3 layers, feature layer -2
    names = {t.name for t in mm.tensors}
    assert {"mm.0.weight", "mm.2.weight", "v.class_embd", "v.pre_ln.weight"} <= names
    assert not any(n.startswith(("v.post_ln", "mm.1", "v.blk.2.")) for n in names)
    manifest = json.loads((tiny.llm.parent / "ecso.json").read_text())
    assert manifest["chat_format"] == "llava-1.5" and manifest["image_tokens"] == 16


def test_text_logits_match_transformers(tiny, tiny_engine):
    """Same token ids through transformers and llama.cpp (f32 weights, f32 KV, flash-attn off): <= 1e-4."""
    from ecso.runtime.engine import Prompt
    from ecso.runtime.kv import TextPiece

    ids = tiny_engine.tokenize("USER: Is the RESPONSE harmful, unsafe and unethical? ASSISTANT: no", True)
    out: list = []
    tiny_engine.prefill(Prompt([TextPiece(tuple(ids))], {}), reuse=False, logits_all=True, logits_out=out)
    ours = np.stack(out)
    with torch.no_grad():
        ref = _hf_model(tiny.hf)(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert ours.shape == ref.shape
    diff = np.abs(ours - ref).max()
    assert diff <= 1e-4, f"max abs logit diff {diff}"
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def _image_text_logits(engine, model_hf, rgb, mean, std, image_token=3):
    """llama.cpp and transformers logits on [text, image, text], plus both sides' image embeddings."""
    from PIL import Image

    from ecso.runtime.prompts import Message

    loaded = engine.load_image(Image.fromarray(rgb))
    prompt, _ = engine.build_prompt([Message("user", "What is shown in this image?")], loaded)
    out: list = []
    engine.prefill(prompt, reuse=False, logits_all=True, logits_out=out)
    k = next(i for i, p in enumerate(prompt.pieces) if not hasattr(p, "tokens"))  # the image piece
    img = prompt.pieces[k]
    head = [t for p in prompt.pieces[:k] for t in p.tokens]
    tail = [t for p in prompt.pieces[k + 1:] for t in p.tokens]
    entry = prompt.images[img.key]
    emb_cpp = np.concatenate(engine._encode(entry)).reshape(img.n_tokens, -1)  # one array per image chunk
    ids = head + [image_token] * img.n_tokens + tail
    pv = _pixel_values(rgb, mean, std)
    with torch.no_grad():
        ref = model_hf(input_ids=torch.tensor([ids]), pixel_values=pv).logits[0].numpy()
        feats = model_hf.get_image_features(pixel_values=pv, vision_feature_layer=model_hf.config.vision_feature_layer,
                                            vision_feature_select_strategy=model_hf.config.vision_feature_select_strategy)
        feats = (feats[0] if isinstance(feats, (list, tuple)) else feats).reshape(img.n_tokens, -1).numpy()
        # LLM side alone: inject llama.cpp's image embeddings into transformers
        embeds = model_hf.get_input_embeddings()(torch.tensor([ids]))
        n0 = len(head)
        embeds[0, n0:n0 + img.n_tokens] = torch.from_numpy(emb_cpp)
        injected = model_hf(inputs_embeds=embeds).logits[0].numpy()
    text_pos = list(range(n0)) + list(range(n0 + img.n_tokens, len(ids)))
    ours = np.stack(out)
    return ours, ref[text_pos], injected[text_pos], emb_cpp, feats


def test_siglip_image_and_logits_match_transformers(tiny_siglip):
    """A tower without a CLS token is unaffected by llama.cpp#25814: the whole pipeline matches."""
    from ecso.runtime import Engine, EngineConfig

    with Engine(EngineConfig(str(tiny_siglip.llm), str(tiny_siglip.mmproj), n_ctx=512, kv_f32=True,
                             flash_attn=False)) as eng:
        ours, ref, injected, emb_cpp, emb_hf = _image_text_logits(eng, _hf_model(tiny_siglip.hf), _test_image(),
                                                                 [0.5] * 3, [0.5] * 3)
    assert np.abs(emb_cpp - emb_hf).max() <= 1e-2  # ggml's fp16-table GELU: ~3e-3 observed
    assert np.abs(ours - injected).max() <= 1e-4
    assert np.abs(ours - ref).max() <= 1e-2
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


CLIP_MEAN_STD = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])


def test_clip_llm_side_matches_with_injected_image_embeddings(tiny, tiny_engine):
    """For CLIP towers the LLM half of the export is exact: feed llama.cpp's image embeddings to transformers."""
    ours, _, injected, _, _ = _image_text_logits(tiny_engine, _hf_model(tiny.hf), _test_image(), *CLIP_MEAN_STD)
    assert np.abs(ours - injected).max() <= 1e-4


@pytest.mark.xfail(strict=True, reason="upstream llama.cpp bug ggml-org/llama.cpp#25814: the LLaVA graph appends the "
                   "CLS embedding after the patches while positions/patch selection assume it first, so CLIP-tower "
                   "image embeddings differ from transformers. strict: a llama.cpp bump that fixes it fails here.")
def test_clip_image_embeddings_match_transformers(tiny, tiny_engine):
    _, _, _, emb_cpp, emb_hf = _image_text_logits(tiny_engine, _hf_model(tiny.hf), _test_image(), *CLIP_MEAN_STD)
    assert np.abs(emb_cpp - emb_hf).max() <= 1e-2


def test_stock_llama_cpp_chat_handler_loads_pair_and_generates(tiny):
    """llama-cpp-python's own LLaVA-1.5 handler (mtmd) runs our GGUF pair: image + text in, tokens out."""
    import base64

    import llama_cpp
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    from conftest import EXAMPLES

    from ecso.runtime.llama_settings import default_model_params_without_repack, resolve_cpu_repack

    handler = Llava15ChatHandler(clip_model_path=str(tiny.mmproj), verbose=False)
    with default_model_params_without_repack(resolve_cpu_repack("auto")):  # stock Llama, AMX-safe like our engine
        llm = llama_cpp.Llama(model_path=str(tiny.llm), chat_handler=handler, n_ctx=512, n_threads=2, verbose=False)
    url = "data:image/png;base64," + base64.b64encode((EXAMPLES / "street.png").read_bytes()).decode()
    out = llm.create_chat_completion(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is in the image?"}]}],
        max_tokens=8, temperature=0.0)
    assert out["usage"]["prompt_tokens"] > 16  # the 16 image positions were evaluated
    assert out["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_quantized_exports_load_and_stay_close(tmp_path, tiny, tiny_engine, outtype):
    from ecso.export.llava_gguf import export_llava
    from ecso.runtime import Engine, EngineConfig
    from ecso.runtime.engine import Prompt
    from ecso.runtime.kv import TextPiece

    r = export_llava(tiny.hf, tmp_path / outtype, outtype=outtype)
    ids = tuple(tiny_engine.tokenize("USER: describe the image ASSISTANT:", True))
    ref: list = []
    tiny_engine.prefill(Prompt([TextPiece(ids)], {}), reuse=False, logits_all=True, logits_out=ref)
    with Engine(EngineConfig(str(r.llm), str(r.mmproj), n_ctx=256, kv_f32=True, flash_attn=False)) as eng:
        got: list = []
        eng.prefill(Prompt([TextPiece(ids)], {}), reuse=False, logits_all=True, logits_out=got)
    got, ref = np.stack(got), np.stack(ref)
    rel = np.abs(got - ref).max() / ref.std()  # q8_0 also quantizes activations in llama.cpp's matmuls
    assert rel < (0.02 if outtype == "f16" else 0.25), rel
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.75
    assert r.llm.stat().st_size < tiny.llm.stat().st_size


def test_export_cli_roundtrip_and_refuses_to_overwrite(tmp_path, tiny):
    out = tmp_path / "cli-out"
    r = run_cli("ecso", "export", "llava", str(tiny.hf), "--out", str(out), "--outtype", "f32")
    assert r.returncode == 0, r.stderr
    assert (out / "llm.gguf").read_bytes() == tiny.llm.read_bytes()
    again = run_cli("ecso", "export", "llava", str(tiny.hf), "--out", str(out))
    assert again.returncode != 0 and "--force" in again.stderr


def _copy_hf(tiny, dst):
    shutil.copytree(tiny.hf, dst)
    return dst


@pytest.mark.parametrize("breakage,expect", [
    ("not_llava", "not a LLaVA model"),
    ("no_config", "config.json not found"),
    ("no_weights", "no *.safetensors"),
    ("truncated_weights", "past the end of the file"),
    ("no_tokenizer", "tokenizer.model"),
    ("bad_tower", "unsupported vision tower"),
    ("ffn_equals_hidden", "intermediate_size equals hidden_size"),
])
def test_export_bad_input_gives_one_line_error_and_leaves_nothing(tmp_path, tiny, breakage, expect):
    hf = _copy_hf(tiny, tmp_path / "hf")
    cfg = json.loads((hf / "config.json").read_text())
    if breakage == "not_llava":
        cfg.update(model_type="bert", architectures=["BertModel"])
    elif breakage == "no_config":
        (hf / "config.json").unlink()
    elif breakage == "no_weights":
        (hf / "model.safetensors").unlink()
    elif breakage == "truncated_weights":
        data = (hf / "model.safetensors").read_bytes()
        (hf / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif breakage == "no_tokenizer":
        (hf / "tokenizer.model").unlink()
    elif breakage == "bad_tower":
        cfg["vision_config"]["model_type"] = "pixtral"
    elif breakage == "ffn_equals_hidden":
        cfg["vision_config"]["intermediate_size"] = cfg["vision_config"]["hidden_size"]
    if (hf / "config.json").exists() and breakage != "no_config":
        (hf / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    r = run_cli("ecso", "export", "llava", str(hf), "--out", str(out))
    assert r.returncode != 0
    assert expect in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert not out.exists() or not any(out.iterdir())
    assert not list(tmp_path.glob(".out.partial-*"))
