"""A tiny random LLaVA-1.5-shaped model, built deterministically in well under a second.

It exists so the exporter, the runtime and the tests run real llama.cpp on real GGUF files without downloading
anything. The model is a Hugging Face folder (config.json, model.safetensors, SentencePiece tokenizer) in the
classic llava-hf key layout, so transformers loads it and our exporter converts it like a real LLaVA.

Shapes are the smallest llama.cpp's clip.cpp loads faithfully: vision 32 hidden / 64 ffn (ffn must differ from hidden,
clip.cpp swaps up/down otherwise), 3 layers, image 56 / patch 14 -> 16 image tokens; Llama 64 / 128, 2 layers,
4 heads / 2 KV heads, vocab 512. Weights come from numpy PCG64 with a fixed seed, so every rebuild is
byte-identical.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ecso.export.safetensors_io import write_file

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_ID = 3

# A fixed corpus the tokenizer is trained on; the words ECSO's prompts use are in it so they tokenize compactly.
_CORPUS = """\
A chat between a curious user and an artificial intelligence assistant.
The assistant gives helpful, detailed, and polite answers to the user's questions.
USER: What is shown in this image? ASSISTANT: The image shows a small red house next to a river.
QUERY: How do I bake bread? RESPONSE: Mix flour, water, salt and yeast, then bake it.
Is the RESPONSE harmful, unsafe and unethical? Answer yes or no: no
REQUEST: What is in the picture. Based on the REQUEST, describe the image.
You are given some hints regarding a question on an image.
Hints: "Answer: a photo of a dog playing in the park"
Based on the hints, answer the following question in a HARMLESS and ETHICAL way.
Safety matters: a model that sees an image can still tell whether its own answer is harmful.
Eyes closed, safety on. The quick brown fox jumps over the lazy dog. 0123456789
Yes. No. yes no maybe. Please describe the scene, the colors, the people and the objects.
"""


@dataclass(frozen=True)
class TinyShape:
    """Sizes of the tiny model; the defaults are the shapes the reference probe proved."""

    tower: str = "clip"  # "clip" (with CLS token, like LLaVA-1.5) or "siglip" (no CLS token)
    vocab: int = 512
    hidden: int = 64
    ffn: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    v_hidden: int = 32
    v_ffn: int = 64
    v_layers: int = 3
    v_heads: int = 2
    image_size: int = 56
    patch_size: int = 14
    seed: int = 1234

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def train_tokenizer(out_path: Path, vocab: int = 512) -> Path:
    """Trains a byte-fallback SentencePiece BPE model on the fixed corpus; deterministic (one thread)."""
    import sentencepiece as spm

    # Train from an iterator into memory: the model proto then records no temp-file paths (byte-identical output).
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter((_CORPUS * 4).splitlines()), model_writer=model, vocab_size=vocab, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=[IMAGE_TOKEN],
        num_threads=1, normalization_rule_name="identity", character_coverage=1.0, minloglevel=2, split_digits=True,
        add_dummy_prefix=True, remove_extra_whitespaces=False, hard_vocab_limit=False,
    )
    data = model.getvalue()
    out_path = Path(out_path)
    out_path.write_bytes(data)
    return out_path


def _weights(shape: TinyShape) -> dict[str, np.ndarray]:
    """Random weights in the classic llava-hf naming; logits end up with std ~1 so comparisons mean something."""
    rng = np.random.Generator(np.random.PCG64(shape.seed))
    w: dict[str, np.ndarray] = {}

    def mat(name: str, *dims: int, scale: float = 0.15) -> None:
        w[name] = (rng.standard_normal(dims) * scale).astype(np.float32)

    def norm(name: str, dim: int, bias: bool) -> None:
        w[name + ".weight"] = (1.0 + rng.standard_normal(dim) * 0.1).astype(np.float32)
        if bias:
            w[name + ".bias"] = (rng.standard_normal(dim) * 0.05).astype(np.float32)

    def linear(name: str, n_out: int, n_in: int, bias: bool = True) -> None:
        mat(name + ".weight", n_out, n_in)
        if bias:
            mat(name + ".bias", n_out, scale=0.05)

    # vision tower
    v = "vision_tower.vision_model."
    clip = shape.tower == "clip"
    n_pos = shape.n_patches + (1 if clip else 0)
    mat(v + "embeddings.patch_embedding.weight", shape.v_hidden, 3, shape.patch_size, shape.patch_size, scale=0.05)
    if clip:
        mat(v + "embeddings.class_embedding", shape.v_hidden)
        norm(v + "pre_layrnorm", shape.v_hidden, bias=True)
    else:
        mat(v + "embeddings.patch_embedding.bias", shape.v_hidden, scale=0.05)
    mat(v + "embeddings.position_embedding.weight", n_pos, shape.v_hidden)
    for i in range(shape.v_layers):
        p = f"{v}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            linear(p + "self_attn." + proj, shape.v_hidden, shape.v_hidden)
        norm(p + "layer_norm1", shape.v_hidden, bias=True)
        norm(p + "layer_norm2", shape.v_hidden, bias=True)
        linear(p + "mlp.fc1", shape.v_ffn, shape.v_hidden)
        linear(p + "mlp.fc2", shape.v_hidden, shape.v_ffn)
    norm(v + "post_layernorm", shape.v_hidden, bias=True)
    # projector
    linear("multi_modal_projector.linear_1", shape.hidden, shape.v_hidden)
    linear("multi_modal_projector.linear_2", shape.hidden, shape.hidden)
    # language model
    t = "language_model.model."
    head_dim = shape.hidden // shape.heads
    mat(t + "embed_tokens.weight", shape.vocab, shape.hidden, scale=0.5)
    for i in range(shape.layers):
        p = f"{t}layers.{i}."
        linear(p + "self_attn.q_proj", shape.hidden, shape.hidden, bias=False)
        linear(p + "self_attn.k_proj", shape.kv_heads * head_dim, shape.hidden, bias=False)
        linear(p + "self_attn.v_proj", shape.kv_heads * head_dim, shape.hidden, bias=False)
        linear(p + "self_attn.o_proj", shape.hidden, shape.hidden, bias=False)
        linear(p + "mlp.gate_proj", shape.ffn, shape.hidden, bias=False)
        linear(p + "mlp.up_proj", shape.ffn, shape.hidden, bias=False)
        linear(p + "mlp.down_proj", shape.hidden, shape.ffn, bias=False)
        norm(p + "input_layernorm", shape.hidden, bias=False)
        norm(p + "post_attention_layernorm", shape.hidden, bias=False)
    norm(t + "norm", shape.hidden, bias=False)
    mat("language_model.lm_head.weight", shape.vocab, shape.hidden, scale=0.5)
    return w


def _config(shape: TinyShape) -> dict:
    clip = shape.tower == "clip"
    vision = {
        "model_type": "clip_vision_model" if clip else "siglip_vision_model",
        "hidden_size": shape.v_hidden, "intermediate_size": shape.v_ffn, "num_hidden_layers": shape.v_layers,
        "num_attention_heads": shape.v_heads, "image_size": shape.image_size, "patch_size": shape.patch_size,
        "num_channels": 3, "layer_norm_eps": 1e-5,
        "hidden_act": "quick_gelu" if clip else "gelu_pytorch_tanh",
    }
    if clip:
        vision["projection_dim"] = shape.hidden
    else:
        vision["vision_use_head"] = False
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": IMAGE_TOKEN_ID,
        "image_seq_length": shape.n_patches,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "vision_feature_layer": -2 if clip else -1,
        "vision_feature_select_strategy": "default" if clip else "full",
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "text_config": {
            "model_type": "llama", "vocab_size": shape.vocab, "hidden_size": shape.hidden,
            "intermediate_size": shape.ffn, "num_hidden_layers": shape.layers,
            "num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads,
            "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
            "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
            "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
        },
        "vision_config": vision,
    }


def _image_processor(shape: TinyShape) -> dict:
    clip = shape.tower == "clip"
    mean = [0.48145466, 0.4578275, 0.40821073] if clip else [0.5, 0.5, 0.5]
    std = [0.26862954, 0.26130258, 0.27577711] if clip else [0.5, 0.5, 0.5]
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True, "size": {"shortest_edge": shape.image_size},
        "do_center_crop": True, "crop_size": {"height": shape.image_size, "width": shape.image_size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": mean, "image_std": std, "do_convert_rgb": True, "resample": 3,
    }


def build_tiny_llava(out_dir: Path, shape: TinyShape = TinyShape()) -> Path:
    """Writes the tiny HF LLaVA folder (config, safetensors, tokenizer) and returns its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_file(_weights(shape), out_dir / "model.safetensors", metadata={"format": "pt"})
    dump = lambda name, obj: (out_dir / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")  # noqa: E731
    dump("config.json", _config(shape))
    dump("preprocessor_config.json", _image_processor(shape))
    train_tokenizer(out_dir / "tokenizer.model", shape.vocab)
    dump("tokenizer_config.json", {
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False, "model_max_length": 1024,
        "added_tokens_decoder": {str(IMAGE_TOKEN_ID): {"content": IMAGE_TOKEN, "special": True, "lstrip": False,
                                                      "rstrip": False, "normalized": False, "single_word": False}},
    })
    dump("special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    return out_dir


def tiny_cache_dir() -> Path:
    """Where `ecso models build-tiny` keeps its output unless told otherwise."""
    from ecso.models.registry import cache_root

    return cache_root() / "tiny"


def sha256_dir(path: Path) -> str:
    """A content hash of every file in a folder (names and bytes), used to prove rebuilds are byte-identical."""
    import hashlib

    h = hashlib.sha256()
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            h.update(os.fsencode(p.relative_to(path)))
            h.update(p.read_bytes())
    return h.hexdigest()
