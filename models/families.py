"""Tiny random checkpoints of the VLM families people run in llama.cpp, built with transformers' own classes.

Why: ecso must prove each family (template, image positions, KV reuse, logits parity) without downloading
anything. Each builder makes a Hugging Face folder the way the real checkpoint looks (config with `architectures`,
safetensors, tokenizer, processor config, the family's chat template) so llama.cpp's own converter
(`ecso.export.llamacpp_convert`) turns it into a GGUF + mmproj pair.

Tokenizer: llama.cpp's converter accepts a BPE tokenizer only if its pre-tokenizer hash is known, so every family
uses the real SmolLM2 vocabulary and merges read from the demo GGUF (its hash is the converter's `smollm` entry),
plus the family's own special tokens. SmolVLM's LLM is SmolLM2, so there it is the real pairing.

Sizes are tiny (3 layers, hidden 64) so building and converting a family takes seconds; the 49k-token embedding
table dominates. torch and transformers are needed here (export extras); the runtime never imports this module.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

FAMILIES = ("qwen2vl", "qwen25vl", "gemma3", "smolvlm")
IMAGE_SIZE = 56  # every tiny tower sees 56 px with 14 px patches
SEED = 1234

# Chat templates, trimmed to the text + single-image subset of each family's official template (the official ones
# also handle tools/video); what matters here is the turn markers and where the image goes.
QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first_user_prefix = messages[0]['content'] + "
    "'\n\n' %}{% set loop_messages = messages[1:] %}{% else %}{% set first_user_prefix = '' %}"
    "{% set loop_messages = messages %}{% endif %}{% for message in loop_messages %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

QWEN_SPECIALS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                 "<|video_pad|>", "<|endoftext|>")
GEMMA3_SPECIALS = ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
                   "<image_soft_token>")
SMOLVLM_SPECIALS = ("<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>") + tuple(
    f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7))


@dataclass(frozen=True)
class FamilyCheckpoint:
    """A built tiny family: its HF folder and the facts tests need."""

    family: str
    hf: Path
    architecture: str  # config.json architectures[0]
    image_token: str  # the placeholder the HF processor expands
    vocab_size: int


def builder_fingerprint() -> str:
    """Hash of this module's source: a change to any builder invalidates cached checkpoints and conversions."""
    return hashlib.sha256(inspect.getsource(inspect.getmodule(builder_fingerprint)).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------- tokenizer
def smollm2_vocab() -> tuple[list[str], list[str]]:
    """SmolLM2's tokens and merges, read from the demo GGUF (real vocabulary, nothing downloaded)."""
    from gguf import GGUFReader

    from ecso.models.demo import demo_llm_path

    reader = GGUFReader(str(demo_llm_path()))

    def strings(key: str) -> list[str]:
        field = reader.fields[key]
        return [bytes(field.parts[i]).decode("utf-8") for i in field.data]

    return strings("tokenizer.ggml.tokens"), strings("tokenizer.ggml.merges")


def write_smollm2_tokenizer(out_dir: Path, specials: tuple[str, ...], template: str, bos: str, eos: str,
                            pad: str, add_bos: bool, vocab_cache: tuple[list[str], list[str]]) -> int:
    """tokenizer.json + tokenizer_config.json: SmolLM2's byte-level BPE with the family's special tokens added.
    Returns the vocabulary size (base + added)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens, merges = vocab_cache
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    base_specials = [t for t in tokens[:17]]
    new = [s for s in specials if s not in vocab]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in base_specials + new])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                   unk_token=None, model_max_length=2048)
    fast.chat_template = template
    fast.add_bos_token = add_bos
    fast.save_pretrained(str(out_dir))
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["add_bos_token"] = add_bos
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return len(tok.get_vocab())


# --------------------------------------------------------------------------------------------- helpers
def seeded_init(model) -> None:
    """Deterministic random weights with logits of std ~1 (defaults leave tiny models near-constant)."""
    import torch

    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.ndim == 1 and name.endswith(".weight") and ("norm" in name or ".ln_" in name):
                base = 0.0 if _zero_centered_norm(model, name) else 1.0
                p.copy_(base + torch.randn(p.shape, generator=g) * 0.1)
            elif p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            else:
                scale = 0.5 if "embed_tokens" in name else 0.15
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _zero_centered_norm(model, name: str) -> bool:
    """Gemma's RMSNorm multiplies by (1 + weight): its neutral weight is 0, not 1 (text side and projector)."""
    return model.config.model_type == "gemma3" and "vision_tower" not in name


def save_checkpoint(model, out_dir: Path, architecture: str, extra: Callable[[dict], None] | None = None) -> None:
    model.save_pretrained(str(out_dir), safe_serialization=True)
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["architectures"] = [architecture]  # save_pretrained of a config-built model may omit it; the converter needs it
    if extra:
        extra(cfg)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def text_sizes(vocab: int) -> dict:
    return dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False)


# --------------------------------------------------------------------------------------------- families
def _build_qwen(out: Path, vocab_cache, v25: bool) -> FamilyCheckpoint:
    import torch

    n = write_smollm2_tokenizer(out, QWEN_SPECIALS, QWEN_TEMPLATE, "<|endoftext|>", "<|im_end|>", "<|endoftext|>",
                                False, vocab_cache)
    tok = json.loads((out / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    text = dict(text_sizes(n), rope_theta=10000.0, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                hidden_act="silu", use_sliding_window=False, bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"])
    common = dict(vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                  image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"], tie_word_embeddings=False)
    if v25:
        from transformers import Qwen2_5_VLConfig as Config, Qwen2_5_VLForConditionalGeneration as Model

        # window 112 as every released Qwen2.5-VL: the converter does not write it and clip.cpp assumes 112
        # (with 56 the image embeddings differed by 0.45); fullatt_block_indexes is required by the converter
        vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=112,
                      fullatt_block_indexes=[1, 3], hidden_act="silu")
        arch = "Qwen2_5_VLForConditionalGeneration"
    else:
        from transformers import Qwen2VLConfig as Config, Qwen2VLForConditionalGeneration as Model

        # depth >= 3: the converter's tensor map for the merger is built per block index (depth 2 fails)
        vision = dict(depth=3, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3, hidden_act="quick_gelu")
        arch = "Qwen2VLForConditionalGeneration"
    config = Config(text_config=text, vision_config=vision, **common)
    torch.manual_seed(SEED)
    model = Model(config).eval()
    seeded_init(model)
    save_checkpoint(model, out, arch)
    px = IMAGE_SIZE * IMAGE_SIZE
    proc = {"image_processor_type": "Qwen2VLImageProcessor", "do_resize": True, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
            "min_pixels": px, "max_pixels": px, "size": {"shortest_edge": px, "longest_edge": px},
            "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "processor_class": "Qwen2VLProcessor"}
    (out / "preprocessor_config.json").write_text(json.dumps(proc, indent=2) + "\n")
    return FamilyCheckpoint("qwen25vl" if v25 else "qwen2vl", out, arch, "<|image_pad|>", n)


def _build_gemma3(out: Path, vocab_cache) -> FamilyCheckpoint:
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    n = write_smollm2_tokenizer(out, GEMMA3_SPECIALS, GEMMA3_TEMPLATE, "<bos>", "<eos>", "<eos>", True, vocab_cache)
    tok = json.loads((out / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    text = dict(text_sizes(n), head_dim=16, query_pre_attn_scalar=16, sliding_window=64, rope_theta=10000.0,
                rope_local_base_freq=10000.0, hidden_activation="gelu_pytorch_tanh", final_logit_softcapping=None,
                attn_logit_softcapping=None, bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"],
                pad_token_id=ids["<eos>"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                  image_size=IMAGE_SIZE, patch_size=14, layer_norm_eps=1e-6, vision_use_head=False)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                          boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
                          image_token_index=ids["<image_soft_token>"], tie_word_embeddings=False)
    torch.manual_seed(SEED)
    model = Gemma3ForConditionalGeneration(config).eval()
    seeded_init(model)
    save_checkpoint(model, out, "Gemma3ForConditionalGeneration")
    proc = {"image_processor_type": "Gemma3ImageProcessor", "do_resize": True, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True, "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5], "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "resample": 2,
            "do_pan_and_scan": False, "image_seq_length": 4, "processor_class": "Gemma3Processor"}
    (out / "preprocessor_config.json").write_text(json.dumps(proc, indent=2) + "\n")
    return FamilyCheckpoint("gemma3", out, "Gemma3ForConditionalGeneration", "<start_of_image>", n)


def _build_smolvlm(out: Path, vocab_cache) -> FamilyCheckpoint:
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    n = write_smollm2_tokenizer(out, SMOLVLM_SPECIALS, SMOLVLM_TEMPLATE, "<|im_start|>", "<end_of_utterance>",
                                "<|im_end|>", False, vocab_cache)
    tok = json.loads((out / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    text = dict(text_sizes(n), model_type="llama", rope_theta=10000.0, hidden_act="silu",
                bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<end_of_utterance>"], pad_token_id=2)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                  image_size=IMAGE_SIZE, patch_size=14, layer_norm_eps=1e-6)
    config = Idefics3Config(text_config=text, vision_config=vision, scale_factor=2, image_token_id=ids["<image>"],
                            tie_word_embeddings=False)
    torch.manual_seed(SEED)
    model = Idefics3ForConditionalGeneration(config).eval()
    seeded_init(model)

    def text_arch(cfg: dict) -> None:  # as SmolVLM's own config: the converter reads the LLM as Llama
        cfg["text_config"]["architectures"] = ["LlamaForCausalLM"]

    save_checkpoint(model, out, "Idefics3ForConditionalGeneration", text_arch)
    proc = {"image_processor_type": "Idefics3ImageProcessor", "do_resize": True, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True, "do_pad": True,
            "do_image_splitting": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
            "max_image_size": {"longest_edge": IMAGE_SIZE}, "size": {"longest_edge": 2 * IMAGE_SIZE},
            "resample": 1, "processor_class": "Idefics3Processor"}
    (out / "preprocessor_config.json").write_text(json.dumps(proc, indent=2) + "\n")
    (out / "processor_config.json").write_text(json.dumps({"image_seq_len": 4,
                                                           "processor_class": "Idefics3Processor"}) + "\n")
    return FamilyCheckpoint("smolvlm", out, "Idefics3ForConditionalGeneration", "<image>", n)


def build_family(family: str, out_dir: Path, vocab_cache=None) -> FamilyCheckpoint:
    """Writes the tiny HF folder of one family into out_dir (deterministic: fixed seed)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; known: {', '.join(FAMILIES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab_cache = vocab_cache or smollm2_vocab()
    if family in ("qwen2vl", "qwen25vl"):
        return _build_qwen(out, vocab_cache, v25=family == "qwen25vl")
    if family == "gemma3":
        return _build_gemma3(out, vocab_cache)
    return _build_smolvlm(out, vocab_cache)
