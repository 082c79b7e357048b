"""A tiny random LLaVA-1.6 (LLaVA-NeXT, "anyres") built with transformers' own LlavaNextForConditionalGeneration,
exported to a GGUF pair by our exporter (export/llava_gguf.py; llama.cpp's pinned converter refuses LlavaNext).

Why: LLaVA-1.6 cuts an image into tiles + an overview; ecso must prove that block (one encode, its positions, KV
reuse) and the parity with transformers without downloading anything. The shape follows the real llava-v1.6
checkpoints: a Llama LLM with a SentencePiece tokenizer (models/tiny.py trains it), vision_feature_layer -2,
select strategy "default" for a CLIP tower (drops CLS) and "full" for a SigLIP one (llama.cpp keeps every patch),
image_grid_pinpoints a few multiples of the tile. Tile 56 px / patch 14 -> 16 tokens per tile. Vision
intermediate_size != hidden_size (clip.cpp swaps the FFN's up/down weights when they are equal).

torch and transformers are needed (export extras); the runtime never imports this module.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path

TOWERS = ("siglip", "clip")
TILE = 56
PATCH = 14
# HF order (height, width), as in llava-v1.6's config ([[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]).
# Deliberately not symmetric (no tall tile grids): a tall image then picks 2x2 tiles, and would pick 1x2 if the
# (height, width) -> (width, height) swap the mmproj needs were wrong, so the tests see the order.
PINPOINTS = ((TILE, 2 * TILE), (2 * TILE, 2 * TILE), (TILE, 3 * TILE))
SEED = 1234


@dataclass(frozen=True)
class TinyLlavaNext:
    """A built and exported tiny LLaVA-1.6: the HF folder and the f32 GGUF pair made from it by our exporter."""

    tower: str
    hf: Path
    llm: Path
    mmproj: Path

    @property
    def tokens_per_tile(self) -> int:
        return (TILE // PATCH) ** 2


def build_llava_next(out_dir: Path, tower: str = "siglip") -> Path:
    """Writes the tiny HF LlavaNext folder (config with `architectures`, safetensors, tokenizer); deterministic."""
    import torch
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    from ecso.models.tiny import IMAGE_TOKEN, IMAGE_TOKEN_ID, train_tokenizer

    if tower not in TOWERS:
        raise ValueError(f"unknown tower {tower!r}; known: {', '.join(TOWERS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clip = tower == "clip"
    text = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
                rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                pad_token_id=0)
    vision = dict(model_type="clip_vision_model" if clip else "siglip_vision_model", hidden_size=32,
                  intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=TILE,
                  patch_size=PATCH, layer_norm_eps=1e-5, hidden_act="quick_gelu" if clip else "gelu_pytorch_tanh")
    if not clip:
        vision["vision_use_head"] = False
    config = LlavaNextConfig(text_config=text, vision_config=vision, image_token_index=IMAGE_TOKEN_ID,
                             image_grid_pinpoints=[list(p) for p in PINPOINTS], vision_feature_layer=-2,
                             vision_feature_select_strategy="default" if clip else "full",
                             projector_hidden_act="gelu", multimodal_projector_bias=True, tie_word_embeddings=False,
                             image_seq_length=(TILE // PATCH) ** 2)
    torch.manual_seed(SEED)
    model = LlavaNextForConditionalGeneration(config).eval()
    _seeded_init(model)
    model.save_pretrained(str(out), safe_serialization=True)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["architectures"] = ["LlavaNextForConditionalGeneration"]  # save_pretrained of a config-built model may omit it
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    mean = [0.48145466, 0.4578275, 0.40821073] if clip else [0.5, 0.5, 0.5]
    std = [0.26862954, 0.26130258, 0.27577711] if clip else [0.5, 0.5, 0.5]
    dump = lambda name, obj: (out / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")  # noqa: E731
    dump("preprocessor_config.json", {
        "image_processor_type": "LlavaNextImageProcessor", "do_resize": True, "size": {"shortest_edge": TILE},
        "do_center_crop": True, "crop_size": {"height": TILE, "width": TILE}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": mean, "image_std": std, "do_pad": True,
        "do_convert_rgb": True, "resample": 3, "image_grid_pinpoints": [list(p) for p in PINPOINTS]})
    train_tokenizer(out / "tokenizer.model", text["vocab_size"])
    dump("tokenizer_config.json", {
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False, "model_max_length": 2048,
        "added_tokens_decoder": {str(IMAGE_TOKEN_ID): {"content": IMAGE_TOKEN, "special": True, "lstrip": False,
                                                      "rstrip": False, "normalized": False, "single_word": False}}})
    dump("special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    return out


def _seeded_init(model) -> None:
    """Deterministic random weights with logits of std ~1 (transformers' defaults leave tiny models near-constant)."""
    import torch

    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.ndim == 1 and name.endswith(".weight") and "norm" in name:
                p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.1)
            elif p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if name.endswith("image_newline") else 0.05))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "embed_tokens" in name else 0.15))


def fingerprint() -> str:
    """Hash of this builder and of the exporter it feeds: a change to either rebuilds the cached pair."""
    from ecso.export import gguf_write, llava_gguf
    from ecso.models import tiny

    h = hashlib.sha256()
    for module in (inspect.getmodule(fingerprint), llava_gguf, gguf_write, tiny):
        h.update(inspect.getsource(module).encode())
    return h.hexdigest()[:16]


def exported_llava_next(tower: str = "siglip", cache: Path | None = None) -> TinyLlavaNext:
    """Builds and exports the tiny LLaVA-1.6 once per machine (cache keyed by `fingerprint()`; atomic)."""
    from ecso.export.llamacpp_convert import machine_cache_root
    from ecso.export.llava_gguf import export_llava

    from ecso.models.converted import cached_build

    def make(tmp: Path) -> None:
        build_llava_next(tmp / "hf", tower)
        export_llava(tmp / "hf", tmp / "gguf", outtype="f32")

    root = (Path(cache) if cache else machine_cache_root()) / "tiny-llava-next"
    out = cached_build(root, fingerprint(), tower, "gguf/ecso.json", make)
    return TinyLlavaNext(tower, out / "hf", out / "gguf" / "llm.gguf", out / "gguf" / "mmproj.gguf")
