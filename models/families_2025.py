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

from ecso.models.families import (FamilyCheckpoint, SEED, save_checkpoint, seeded_init, text_sizes, smollm2_vocab,
                                  write_smollm2_tokenizer)


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

# Mistral Small 3.1's template, trimmed: [INST] turns, system prompt in [SYSTEM_PROMPT], the image as [IMG].
MISTRAL3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "[SYSTEM_PROMPT]{{ message['content'] }}[/SYSTEM_PROMPT]{% elif message['role'] == 'user' %}[INST]"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'text' %}{{ c['text'] }}{% elif c['type'] == 'image' %}[IMG]{% endif %}{% endfor %}"
    "{% endif %}[/INST]{% else %}{{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
MISTRAL3_SPECIALS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]",
                     "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]")
# LFM2-VL: ChatML with a start-of-text BOS, the image as <image>.
LFM2VL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LFM2VL_SPECIALS = ("<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>",
                   "<|image_start|>", "<|image_end|>", "<|img_thumbnail|>") + tuple(
    f"<|img_row_{r}_col_{c}|>" for r in range(1, 4) for c in range(1, 4))
# GLM-4.1V: [gMASK]<sop> then <|role|> turns; the image as <|begin_of_image|><|image|><|end_of_image|>.
GLM4V_TEMPLATE = (
    "[gMASK]<sop>{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|begin_of_image|><|image|><|end_of_image|>{% elif c['type'] == 'text' %}"
    "{{ c['text'] }}{% endif %}{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>\n"
    "{% endif %}"
)
GLM4V_SPECIALS = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                  "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|image|>",
                  "<|begin_of_video|>", "<|end_of_video|>", "<|video|>")
# Llama 4: header turns, the image as <|image|> (the processor expands it; mtmd writes its own block).
LLAMA4_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|header_start|>{{ message['role'] }}<|header_end|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|image|>{% elif c['type'] == 'text' %}"
    "{{ c['text'] | trim }}{% endif %}{% endfor %}{% endif %}<|eot|>{% endfor %}"
    "{% if add_generation_prompt %}<|header_start|>assistant<|header_end|>\n\n{% endif %}"
)
LLAMA4_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|eot|>", "<|header_start|>", "<|header_end|>",
                   "<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>", "<|tile_x_separator|>",
                   "<|tile_y_separator|>", "<|finetune_right_pad_id|>")


def _added_ids(out: Path) -> dict[str, int]:
    tok = json.loads((out / "tokenizer.json").read_text())
    return {t["content"]: t["id"] for t in tok["added_tokens"]}


def _build_qwen3vl(out: Path, vocab_cache) -> FamilyCheckpoint:
    """Interleaved M-RoPE (sections 3/3/2 over the 8 rotary pairs of head_dim 16) and two deepstack layers: the
    LLM's input rows are 64 x (1 + 2) = 192 floats wide (`llama_model_n_embd_inp`), three times its hidden size.

    Sections: llama.cpp's interleaved M-RoPE (ggml-cpu ops.cpp, the `is_imrope` branch of the rope kernel) gives a
    pair the temporal position only while its index is below 3 x sections[0] and otherwise the 4th position, which
    is 0 for text; transformers' `apply_interleaved_mrope` leaves every unassigned pair temporal. 3/3/2 assigns
    all 8 pairs, so both agree; with 2/3/3, pair 6 differed (text logits off by 4e-2). Real Qwen3-VL (24/20/20
    over 64 pairs) differs only on pairs 61-62, which turn ~1e-6 rad per position."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    n = write_smollm2_tokenizer(out, QWEN_SPECIALS, QWEN3_TEMPLATE, "<|endoftext|>", "<|im_end|>", "<|endoftext|>",
                                False, vocab_cache)
    ids = _added_ids(out)
    text = dict(text_sizes(n), head_dim=16, rope_theta=10000.0, hidden_act="silu",
                rope_scaling={"rope_type": "default", "mrope_section": [3, 3, 2], "mrope_interleaved": True},
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
    seeded_init(model)
    arch = "Qwen3VLForConditionalGeneration"
    save_checkpoint(model, out, arch)
    px = 64 * 64
    proc = {"image_processor_type": "Qwen2VLImageProcessor", "do_resize": True, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
            "min_pixels": px, "max_pixels": 4 * px, "size": {"shortest_edge": px, "longest_edge": 4 * px},
            "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "processor_class": "Qwen3VLProcessor"}
    (out / "preprocessor_config.json").write_text(json.dumps(proc, indent=2) + "\n")
    return FamilyCheckpoint("qwen3vl", out, arch, "<|image_pad|>", n)


def _finish(model_cls, config, out: Path, arch: str, extra=None):
    import torch

    torch.manual_seed(SEED)
    model = model_cls(config).eval()
    seeded_init(model)
    save_checkpoint(model, out, arch, extra)
    return model


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _build_mistral3(out: Path, vocab_cache) -> FamilyCheckpoint:
    """Mistral Small 3.x: a Mistral LLM, Pixtral's vision tower (2D RoPE, any image size up to image_size) and a
    2x2 patch merger; mtmd writes one [IMG_BREAK] embedding after each row of image tokens."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    n = write_smollm2_tokenizer(out, MISTRAL3_SPECIALS, MISTRAL3_TEMPLATE, "<s>", "</s>", "<unk>", True, vocab_cache)
    ids = _added_ids(out)
    text = dict(text_sizes(n), model_type="mistral", head_dim=16, rope_theta=10000.0, hidden_act="silu",
                sliding_window=None, bos_token_id=ids["<s>"], eos_token_id=ids["</s>"])
    vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=2, image_size=112, patch_size=14, rope_theta=10000.0, hidden_act="silu",
                  head_dim=16)
    config = Mistral3Config(text_config=text, vision_config=vision, image_token_index=ids["[IMG]"],
                            spatial_merge_size=2, multimodal_projector_bias=False, vision_feature_layer=-1)
    arch = "Mistral3ForConditionalGeneration"
    _finish(Mistral3ForConditionalGeneration, config, out, arch)
    _write_json(out / "preprocessor_config.json", {
        "image_processor_type": "PixtralImageProcessor", "do_resize": True, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "patch_size": {"height": 14, "width": 14}, "size": {"longest_edge": 112}, "resample": 3,
        "processor_class": "PixtralProcessor"})
    _write_json(out / "processor_config.json", {"image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]",
                                                "image_token": "[IMG]", "patch_size": 14, "spatial_merge_size": 2,
                                                "processor_class": "PixtralProcessor"})
    return FamilyCheckpoint("mistral3", out, arch, "[IMG]", n)


def _build_lfm2vl(out: Path, vocab_cache) -> FamilyCheckpoint:
    """LFM2-VL: LFM2's hybrid LLM (short convolutions + attention layers) and a SigLIP2 NaFlex tower."""
    from transformers import Lfm2VlConfig, Lfm2VlForConditionalGeneration

    n = write_smollm2_tokenizer(out, LFM2VL_SPECIALS, LFM2VL_TEMPLATE, "<|startoftext|>", "<|im_end|>", "<|pad|>",
                                True, vocab_cache)
    ids = _added_ids(out)
    text = dict(text_sizes(n), model_type="lfm2", norm_eps=1e-5, rope_theta=10000.0, conv_L_cache=3,
                conv_bias=False, block_auto_adjust_ff_dim=False, block_multiple_of=16, block_ffn_dim_multiplier=1.0,
                block_ff_dim=128, layer_types=["conv", "full_attention", "conv"], bos_token_id=ids["<|startoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|pad|>"], tie_word_embeddings=True)
    vision = dict(model_type="siglip2_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=2, num_patches=256, patch_size=16, layer_norm_eps=1e-6,
                  vision_use_head=False)
    config = Lfm2VlConfig(text_config=text, vision_config=vision, image_token_id=ids["<image>"],
                          projector_hidden_size=64, downsample_factor=2, projector_bias=True,
                          tie_word_embeddings=True)  # as LFM2-VL: no lm_head (the mmproj converter cannot map one)
    arch = "Lfm2VlForConditionalGeneration"

    def text_arch(cfg: dict) -> None:  # as LFM2-VL's own config: the converter reads the LLM as LFM2
        cfg["text_config"]["architectures"] = ["Lfm2ForCausalLM"]

    _finish(Lfm2VlForConditionalGeneration, config, out, arch, text_arch)
    _write_json(out / "preprocessor_config.json", {
        "image_processor_type": "Lfm2VlImageProcessor", "do_resize": True, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "do_image_splitting": False, "min_image_tokens": 4, "max_image_tokens": 16, "encoder_patch_size": 16,
        "downsample_factor": 2, "processor_class": "Lfm2VlProcessor"})
    return FamilyCheckpoint("lfm2vl", out, arch, "<image>", n)


def _build_glm4v(out: Path, vocab_cache) -> FamilyCheckpoint:
    """GLM-4.1V: GLM-4's LLM with M-RoPE over half the head (partial rotary 0.5) and a Qwen2-VL-like tower with
    learned, interpolated position embeddings."""
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration

    n = write_smollm2_tokenizer(out, GLM4V_SPECIALS, GLM4V_TEMPLATE, "<|endoftext|>", "<|user|>", "<|endoftext|>",
                                False, vocab_cache)
    ids = _added_ids(out)
    text = dict(text_sizes(n), rope_theta=10000.0, hidden_act="silu", partial_rotary_factor=0.5,
                rope_scaling={"rope_type": "default", "mrope_section": [2, 1, 1]}, attention_bias=True,
                rms_norm_eps=1e-5, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|user|>"],
                pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, image_size=56,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64, hidden_act="silu",
                  rms_norm_eps=1e-5, in_channels=3)
    config = Glm4vConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image|>"],
                         video_token_id=ids["<|video|>"], image_start_token_id=ids["<|begin_of_image|>"],
                         image_end_token_id=ids["<|end_of_image|>"], video_start_token_id=ids["<|begin_of_video|>"],
                         video_end_token_id=ids["<|end_of_video|>"], tie_word_embeddings=False)
    arch = "Glm4vForConditionalGeneration"
    _finish(Glm4vForConditionalGeneration, config, out, arch)
    px = 56 * 56
    _write_json(out / "preprocessor_config.json", {
        "image_processor_type": "Glm4vImageProcessor", "do_resize": True, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "size": {"shortest_edge": px, "longest_edge": 16 * px}, "patch_size": 14, "temporal_patch_size": 2,
        "merge_size": 2, "processor_class": "Glm4vProcessor"})
    return FamilyCheckpoint("glm4v", out, arch, "<|image|>", n)


def _build_llama4(out: Path, vocab_cache) -> FamilyCheckpoint:
    """Llama 4 without its MoE layers (interleave step 4 > 3 layers: all dense), chunked attention of 32 tokens
    on the RoPE layers and global attention without RoPE on every 4th (NoPE), a pixel-shuffle projector."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    n = write_smollm2_tokenizer(out, LLAMA4_SPECIALS, LLAMA4_TEMPLATE, "<|begin_of_text|>", "<|eot|>",
                                "<|finetune_right_pad_id|>", True, vocab_cache)
    ids = _added_ids(out)
    text = dict(text_sizes(n), head_dim=16, intermediate_size_mlp=128, rope_theta=10000.0, hidden_act="silu",
                rms_norm_eps=1e-5, num_local_experts=1, num_experts_per_tok=1, interleave_moe_layer_step=4,
                use_qk_norm=True, no_rope_layer_interval=4, attention_chunk_size=32, attn_temperature_tuning=False,
                bos_token_id=ids["<|begin_of_text|>"], eos_token_id=ids["<|eot|>"],
                pad_token_id=ids["<|finetune_right_pad_id|>"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=56,
                  patch_size=14, norm_eps=1e-5, vision_output_dim=32, pixel_shuffle_ratio=0.5,
                  projector_input_dim=64, projector_output_dim=64, hidden_act="gelu")
    config = Llama4Config(text_config=text, vision_config=vision, boi_token_index=ids["<|image_start|>"],
                          eoi_token_index=ids["<|image_end|>"], image_token_index=ids["<|patch|>"],
                          tie_word_embeddings=False)
    arch = "Llama4ForConditionalGeneration"
    _finish(Llama4ForConditionalGeneration, config, out, arch)
    _write_json(out / "preprocessor_config.json", {
        "image_processor_type": "Llama4ImageProcessor", "do_resize": True, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True, "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5], "size": {"height": 56, "width": 56}, "max_patches": 1,
        "resize_to_max_canvas": False, "processor_class": "Llama4Processor"})
    return FamilyCheckpoint("llama4", out, arch, "<|image|>", n)


_BUILDERS = {"qwen3vl": _build_qwen3vl, "mistral3": _build_mistral3, "lfm2vl": _build_lfm2vl, "glm4v": _build_glm4v,
             "llama4": _build_llama4}
FAMILIES_2025 = tuple(_BUILDERS)


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
