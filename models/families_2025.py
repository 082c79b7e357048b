"""Tiny random checkpoints of the VLM families of 2025-2026, built with transformers' own classes.

Same purpose and scheme as `ecso.models.families` (SmolLM2's real vocabulary, 3 tiny layers, seeded weights, the
family's trimmed chat template, a processor config), for the families the pinned llama.cpp converter and mtmd
support beyond Qwen2/2.5-VL, Gemma 3 and SmolVLM. Each builder writes the folder layout llama.cpp's converter reads
(`convert_hf_to_gguf.py` and its `conversion/*.py`), which is not always transformers' own layout (InternVL).

torch and transformers are needed here (export extras); the runtime never imports this module.
"""

from __future__ import annotations

import json
from pathlib import Path

from ecso.models.families import (FamilyCheckpoint, SEED, _save, _seeded_init, _text_sizes, smollm2_vocab,
                                  write_smollm2_tokenizer)

FAMILIES_2025 = ("qwen3vl",)

# Qwen3-VL's official template without tools/video/thinking: no default system turn (unlike Qwen2-VL's).
QWEN3_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_SPECIALS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                 "<|video_pad|>", "<|endoftext|>")


def _added_ids(out: Path) -> dict[str, int]:
    tok = json.loads((out / "tokenizer.json").read_text())
    return {t["content"]: t["id"] for t in tok["added_tokens"]}


def _build_qwen3vl(out: Path, vocab_cache) -> FamilyCheckpoint:
    """Interleaved M-RoPE (sections 2/3/3 of head_dim 16) and two deepstack layers: the LLM's input rows are
    64 x (1 + 2) = 192 floats wide (`llama_model_n_embd_inp`), three times its hidden size."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    n = write_smollm2_tokenizer(out, QWEN_SPECIALS, QWEN3_TEMPLATE, "<|endoftext|>", "<|im_end|>", "<|endoftext|>",
                                False, vocab_cache)
    ids = _added_ids(out)
    text = dict(_text_sizes(n), head_dim=16, rope_theta=10000.0, hidden_act="silu",
                rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
    # depth >= 3 (the converter's merger name table); num_position_embeddings a square (8 x 8 patches of 16 px)
    vision = dict(depth=3, hidden_size=48, intermediate_size=96, num_heads=3, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=64,
                  deepstack_visual_indexes=[0, 1], hidden_act="gelu_pytorch_tanh", in_channels=3)
    config = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    torch.manual_seed(SEED)
    model = Qwen3VLForConditionalGeneration(config).eval()
    _seeded_init(model)
    arch = "Qwen3VLForConditionalGeneration"
    _save(model, out, arch)
    px = 64 * 64
    proc = {"image_processor_type": "Qwen2VLImageProcessor", "do_resize": True, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
            "min_pixels": px, "max_pixels": 4 * px, "size": {"shortest_edge": px, "longest_edge": 4 * px},
            "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "processor_class": "Qwen3VLProcessor"}
    (out / "preprocessor_config.json").write_text(json.dumps(proc, indent=2) + "\n")
    return FamilyCheckpoint("qwen3vl", out, arch, "<|image_pad|>", n)


_BUILDERS = {"qwen3vl": _build_qwen3vl}


def build_family_2025(family: str, out_dir: Path, vocab_cache=None) -> FamilyCheckpoint:
    """Writes the tiny HF folder of one family into out_dir (deterministic: fixed seed)."""
    if family not in _BUILDERS:
        raise ValueError(f"unknown tiny family {family!r}; known: {', '.join(FAMILIES_2025)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return _BUILDERS[family](out, vocab_cache or smollm2_vocab())


def builder_fingerprint() -> str:
    """Hash of this module's and `ecso.models.families`' sources (the shared tokenizer and weight helpers)."""
    import hashlib
    import inspect
    import sys

    from ecso.models import families

    src = inspect.getsource(sys.modules[__name__]) + inspect.getsource(families)
    return hashlib.sha256(src.encode()).hexdigest()[:16]
