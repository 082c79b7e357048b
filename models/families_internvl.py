"""A tiny random InternVL (InternVL3 shape: InternViT-style tower, pixel-shuffle `mlp1` projector, Qwen2 LLM).

Built with transformers' own `InternVLForConditionalGeneration` (saved under `transformers/` for the parity
checks), then given the config llama.cpp's converter reads: OpenGVLab's original `config.json` shape
(`architectures: ["InternVLChatModel"]`, `llm_config` with `Qwen2ForCausalLM`, `vision_config` with
`InternVisionModel`, top-level `downsample_ratio` and `min/max_dynamic_patch`). `save_pretrained` writes the
tensors under transformers' legacy names (`vision_tower.*`, `multi_modal_projector.*`, `language_model.model.*`);
the converter takes the tower and projector only under the names of Intern-S1 (transformers' layout published
with a `model.` prefix, mapped by gguf's tensor_mapping, the projector to `mlp1.{0,1,3}`), so those two get the
prefix (`_CONVERTER_PREFIX`); the LLM's names are read as they are. `model_type` is `internvl_chat`, which
transformers does not know, so the converter reads config.json as written.

torch and transformers are needed here (export extras); the runtime never imports this module.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ecso.models.families import (FamilyCheckpoint, SEED, seeded_init, smollm2_vocab, text_sizes,
                                  write_smollm2_tokenizer)

# InternVL3's ChatML template, trimmed: the image as <IMG_CONTEXT>\n (InternVLProcessor turns that one token into
# <img> n x <IMG_CONTEXT> </img>; mtmd writes <img> [embeddings] </img> for the media marker).
INTERNVL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<IMG_CONTEXT>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
INTERNVL_SPECIALS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<img>", "</img>", "<IMG_CONTEXT>",
                     "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")
IMAGE_SIZE = 112  # one 112 px tile of 8 x 8 patches of 14 px; pixel shuffle 0.5 -> 16 image tokens
TRANSFORMERS_DIR = "transformers"  # the transformers-layout copy, inside the converter's folder
_CONVERTER_PREFIX = "model."  # tower and projector names as Intern-S1 publishes them


def build_family_internvl(family: str, out_dir: Path, vocab_cache=None) -> FamilyCheckpoint:
    """Writes the tiny InternVL into out_dir (deterministic: fixed seed), as `converted_family` builds families."""
    if family != "internvl":
        raise ValueError(f"this builder makes only the tiny 'internvl', not {family!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return build_internvl(out, vocab_cache or smollm2_vocab())


def build_internvl(out: Path, vocab_cache) -> FamilyCheckpoint:
    """The transformers checkpoint in out/transformers, the converter's folder in out."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    hf = out / TRANSFORMERS_DIR
    hf.mkdir(parents=True, exist_ok=True)
    n = write_smollm2_tokenizer(hf, INTERNVL_SPECIALS, INTERNVL_TEMPLATE, "<|endoftext|>", "<|im_end|>",
                                "<|endoftext|>", False, vocab_cache)
    ids = {t["content"]: t["id"] for t in json.loads((hf / "tokenizer.json").read_text())["added_tokens"]}
    text = dict(text_sizes(n), model_type="qwen2", rope_theta=10000.0, hidden_act="silu", use_sliding_window=False,
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
    # 4 layers: the converter maps `mlp1.{bid}` through the tower's block table, so mlp1.3 needs >= 4 blocks
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                  image_size=[IMAGE_SIZE, IMAGE_SIZE], patch_size=[14, 14], hidden_act="gelu", norm_type="layer_norm",
                  layer_norm_eps=1e-6, use_qk_norm=False, attention_bias=True, use_mean_pooling=True,
                  layer_scale_init_value=0.1)
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=ids["<IMG_CONTEXT>"],
                            image_seq_length=16, downsample_ratio=0.5, projector_hidden_act="gelu",
                            vision_feature_layer=-1, vision_feature_select_strategy="default",
                            tie_word_embeddings=False)
    torch.manual_seed(SEED)
    model = InternVLForConditionalGeneration(config).eval()
    seeded_init(model)
    model.save_pretrained(str(hf), safe_serialization=True)
    cfg = json.loads((hf / "config.json").read_text())
    cfg["architectures"] = ["InternVLForConditionalGeneration"]
    (hf / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    proc = {"image_processor_type": "GotOcr2ImageProcessor", "do_resize": True, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True, "image_mean": mean,
            "image_std": std, "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "crop_to_patches": False,
            "min_patches": 1, "max_patches": 1, "resample": 3, "processor_class": "InternVLProcessor"}
    (hf / "preprocessor_config.json").write_text(json.dumps(proc, indent=2) + "\n")

    # the converter's folder: the same tokenizer and tensors (tower and projector renamed), OpenGVLab's config.json
    for f in hf.iterdir():
        if f.is_file() and f.name not in ("config.json", "model.safetensors"):
            shutil.copy2(f, out / f.name)
    tensors = load_file(str(hf / "model.safetensors"))
    save_file({(_CONVERTER_PREFIX + k if k.startswith(("vision_tower.", "multi_modal_projector.")) else k): v
               for k, v in tensors.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    llm = dict(cfg["text_config"], architectures=["Qwen2ForCausalLM"])
    vis = dict(cfg["vision_config"], architectures=["InternVisionModel"])
    chat = {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "llm_config": llm,
            "vision_config": vis, "downsample_ratio": 0.5, "min_dynamic_patch": 1, "max_dynamic_patch": 1,
            "dynamic_image_size": False, "use_thumbnail": False, "force_image_size": IMAGE_SIZE,
            "select_layer": -1, "template": "internvl2_5", "ps_version": "v2", "torch_dtype": "float32"}
    (out / "config.json").write_text(json.dumps(chat, indent=2, sort_keys=True) + "\n")
    return FamilyCheckpoint("internvl", out, "InternVLForConditionalGeneration", "<IMG_CONTEXT>", n)


def builder_fingerprint() -> str:
    """Hash of this module's and `ecso.models.families`' sources (the shared tokenizer and weight helpers)."""
    import hashlib
    import inspect
    import sys

    from ecso.models import families

    src = inspect.getsource(sys.modules[__name__]) + inspect.getsource(families)
    return hashlib.sha256(src.encode()).hexdigest()[:16]
