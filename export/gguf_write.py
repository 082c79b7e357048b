"""GGUF writers for a Llama-architecture LLM and a LLaVA-style mmproj (CLIP/SigLIP tower + MLP projector).

Needs only numpy and the `gguf` package, so the demo projector can be written on a runtime-only install.
The mmproj layout is what llama.cpp's clip.cpp reads:
the projector is `mm.0` / `mm.2`, `clip.vision.feature_layer` is written explicitly with
`block_count = max(feature_layer)`, and `v.post_ln` is never written (HF LLaVA uses the pre-post-LN state).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import gguf
import numpy as np

from ecso.runtime.prompts import DATA as PROMPT_DATA

OUTTYPES = ("f32", "f16", "q8_0")

# Vicuna v1 (LLaVA-1.5) as a chat template (the system prompt LLaVA-1.5's eval scripts use). The text lives in
# runtime/ecso_prompts.json, where the native engine finds it too (it renders this template without Jinja).
LLAVA15_TEMPLATE = next(t["template"] for t in PROMPT_DATA["gguf_templates"] if t["renderer"] == "llava-1.5")


class GGUFWriteError(ValueError):
    """A tensor or parameter that cannot be written (wrong shape, unsupported type)."""


@dataclass(frozen=True)
class LlmParams:
    """Hyper-parameters of a Llama-architecture language model."""

    vocab_size: int
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    context_length: int = 4096
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    name: str = "llava-llm"


@dataclass(frozen=True)
class Vocab:
    """A SentencePiece ("llama") vocabulary: pieces, scores and gguf token types, plus special ids."""

    tokens: list[str]
    scores: list[float]
    types: list[int]
    bos_id: int = 1
    eos_id: int = 2
    unk_id: int = 0
    pad_id: int | None = None
    add_bos: bool = True
    add_space_prefix: bool = True


@dataclass(frozen=True)
class VisionParams:
    """Hyper-parameters of a ViT tower and its MLP projector, as clip.cpp reads them."""

    image_size: int
    patch_size: int
    hidden: int
    ffn: int
    heads: int
    layers: int  # layers present in the HF tower
    feature_layer: int  # HF `vision_feature_layer` (negative counts from the end)
    projection_dim: int  # LLM hidden size
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    use_gelu: bool  # True: exact/tanh GELU (SigLIP); False: quick_gelu (CLIP)
    eps: float = 1e-5
    name: str = "llava-mmproj"
    # LLaVA-1.6 ("anyres"): the tile resolutions as Hugging Face lists them, (height, width) each. Non-empty makes
    # mtmd split an image into tiles + an overview (its llava_uhd preprocessor).
    grid_pinpoints: tuple[tuple[int, int], ...] = ()

    @property
    def gguf_feature_layer(self) -> int:
        """Number of encoder layers llama.cpp must run so its output equals HF hidden_states[feature_layer]."""
        fl = self.feature_layer if self.feature_layer >= 0 else self.layers + self.feature_layer + 1
        if not 1 <= fl <= self.layers:
            raise GGUFWriteError(f"vision_feature_layer {self.feature_layer} is outside a {self.layers}-layer tower")
        return fl


@dataclass
class WriteReport:
    """What was written, for the manifest."""

    path: str
    n_tensors: int = 0
    n_bytes: int = 0
    tensor_types: dict[str, int] = field(default_factory=dict)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half Q/K rows -> GGML interleaved RoPE layout."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _store(writer: gguf.GGUFWriter, name: str, arr: np.ndarray, outtype: str, report: WriteReport,
           quantizable: bool = True) -> None:
    """Adds one tensor in the requested type; 1-D tensors (norms, biases) always stay f32."""
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.all(np.isfinite(arr)):
        raise GGUFWriteError(f"tensor {name} has NaN or Inf values")
    if arr.ndim <= 1 or outtype == "f32" or not quantizable:
        qtype = gguf.GGMLQuantizationType.F32 if (arr.ndim <= 1 or outtype == "f32") else gguf.GGMLQuantizationType.F16
    elif outtype == "q8_0" and arr.ndim == 2 and arr.shape[-1] % 32 == 0:
        qtype = gguf.GGMLQuantizationType.Q8_0
    else:
        qtype = gguf.GGMLQuantizationType.F16
    if qtype == gguf.GGMLQuantizationType.F32:
        data = arr
    elif qtype == gguf.GGMLQuantizationType.F16:
        data = arr.astype(np.float16)
    else:
        data = gguf.quants.quantize(arr, qtype)
    # quantized data is a byte array; gguf infers the logical shape from it and raw_dtype
    writer.add_tensor(name, data, raw_dtype=qtype if qtype == gguf.GGMLQuantizationType.Q8_0 else None)
    report.n_tensors += 1
    report.n_bytes += data.nbytes
    key = qtype.name.lower()
    report.tensor_types[key] = report.tensor_types.get(key, 0) + 1


_FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
               "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}

# HF Llama tensor names (without the leading "model.") -> GGUF names.
_LLM_LAYER = {
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def write_llm(path: Path, hp: LlmParams, vocab: Vocab, get: Callable[[str], np.ndarray], outtype: str = "f32",
              chat_template: str | None = LLAVA15_TEMPLATE) -> WriteReport:
    """Writes a llama-arch GGUF. `get(name)` returns an HF tensor by its name relative to the LLM
    (`embed_tokens.weight`, `layers.0.self_attn.q_proj.weight`, `norm.weight`, `lm_head.weight`)."""
    if outtype not in OUTTYPES:
        raise GGUFWriteError(f"outtype must be one of {OUTTYPES}, not {outtype!r}")
    if len(vocab.tokens) != hp.vocab_size:
        raise GGUFWriteError(f"tokenizer has {len(vocab.tokens)} tokens but the model has {hp.vocab_size} rows")
    head_dim = hp.hidden // hp.heads
    report = WriteReport(str(path))
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_name(hp.name)
    w.add_file_type(_FILE_TYPES[outtype])
    w.add_context_length(hp.context_length)
    w.add_embedding_length(hp.hidden)
    w.add_block_count(hp.layers)
    w.add_feed_forward_length(hp.ffn)
    w.add_head_count(hp.heads)
    w.add_head_count_kv(hp.kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(hp.rope_theta)
    w.add_layer_norm_rms_eps(hp.rms_eps)
    w.add_vocab_size(hp.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab.tokens)
    w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    w.add_bos_token_id(vocab.bos_id)
    w.add_eos_token_id(vocab.eos_id)
    w.add_unk_token_id(vocab.unk_id)
    if vocab.pad_id is not None:
        w.add_pad_token_id(vocab.pad_id)
    w.add_add_bos_token(vocab.add_bos)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(vocab.add_space_prefix)
    if chat_template:
        w.add_chat_template(chat_template)

    def put(name: str, arr: np.ndarray, expect: tuple[int, ...]) -> None:
        if tuple(arr.shape) != expect:
            raise GGUFWriteError(f"{name}: shape {tuple(arr.shape)}, expected {expect}")
        _store(w, name, arr, outtype, report)

    put("token_embd.weight", get("embed_tokens.weight"), (hp.vocab_size, hp.hidden))
    for i in range(hp.layers):
        for hf, gg in _LLM_LAYER.items():
            arr = get(f"layers.{i}.{hf}")
            if hf.startswith("self_attn.q_proj"):
                arr = permute_qk(arr, hp.heads)
            elif hf.startswith("self_attn.k_proj"):
                arr = permute_qk(arr, hp.kv_heads)
            expect = {
                "attn_q.weight": (hp.hidden, hp.hidden), "attn_k.weight": (hp.kv_heads * head_dim, hp.hidden),
                "attn_v.weight": (hp.kv_heads * head_dim, hp.hidden), "attn_output.weight": (hp.hidden, hp.hidden),
                "ffn_gate.weight": (hp.ffn, hp.hidden), "ffn_up.weight": (hp.ffn, hp.hidden),
                "ffn_down.weight": (hp.hidden, hp.ffn), "attn_norm.weight": (hp.hidden,),
                "ffn_norm.weight": (hp.hidden,),
            }[gg]
            put(f"blk.{i}.{gg}", arr, expect)
    put("output_norm.weight", get("norm.weight"), (hp.hidden,))
    put("output.weight", get("lm_head.weight"), (hp.vocab_size, hp.hidden))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return report


# HF vision tower names (relative to `vision_model.`) -> GGUF mmproj names; {i} is the layer.
_VISION_LAYER = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2",
    "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down",
}


def write_mmproj(path: Path, vp: VisionParams, get: Callable[[str], np.ndarray], has: Callable[[str], bool],
                 outtype: str = "f32") -> WriteReport:
    """Writes a LLaVA mmproj GGUF. `get(name)` returns a tower tensor by its name relative to `vision_model.`
    (`embeddings.patch_embedding.weight`, ...), a projector tensor as `projector.linear_1.weight`, or LLaVA-1.6's
    `image_newline`; `has(name)` asks the same names."""
    if vp.ffn == vp.hidden:
        # clip.cpp's legacy heuristic swaps ffn up/down when ffn_down.ne[0] == n_embd: the output would be wrong.
        raise GGUFWriteError("vision intermediate_size equals hidden_size; llama.cpp would swap the FFN weights "
                             "(clip.cpp swaps up/down when ffn_down's width equals the hidden size), so this tower cannot be "
                             "exported faithfully")
    fl = vp.gguf_feature_layer
    mm_out = vp.projection_dim
    outtype_v = "f16" if outtype == "q8_0" else outtype  # vision towers stay f16 at q8_0
    report = WriteReport(str(path))
    w = gguf.GGUFWriter(str(path), arch="clip")
    w.add_name(vp.name)
    w.add_file_type(_FILE_TYPES[outtype_v])
    w.add_clip_has_vision_encoder(True)
    w.add_bool(gguf.Keys.Clip.HAS_LLAVA_PROJECTOR, True)
    w.add_clip_projector_type(gguf.VISION_PROJECTOR_TYPE_NAMES[gguf.VISION_PROJECTOR_TYPE.MLP])
    w.add_vision_image_size(vp.image_size)
    w.add_vision_patch_size(vp.patch_size)
    w.add_vision_embedding_length(vp.hidden)
    w.add_vision_feed_forward_length(vp.ffn)
    w.add_vision_projection_dim(mm_out)
    w.add_vision_head_count(vp.heads)
    w.add_vision_attention_layernorm_eps(vp.eps)
    w.add_vision_block_count(fl)
    w.add_array("clip.vision.feature_layer", [fl])
    w.add_vision_image_mean(list(vp.image_mean))
    w.add_vision_image_std(list(vp.image_std))
    w.add_vision_use_gelu(vp.use_gelu)
    if vp.grid_pinpoints:
        # clip.cpp reads the flat array as (width, height) pairs; HF lists (height, width): swap each pair, as the
        # pinned converter does for Granite vision (conversion/granite.py)
        w.add_array("clip.vision.image_grid_pinpoints", [v for h, wd in vp.grid_pinpoints for v in (wd, h)])
        w.add_string("clip.vision.mm_patch_merge_type", "spatial_unpad")

    def put(name: str, arr: np.ndarray, expect: tuple[int, ...] | None = None, quantizable: bool = True) -> None:
        if expect is not None and tuple(arr.shape) != expect:
            raise GGUFWriteError(f"{name}: shape {tuple(arr.shape)}, expected {expect}")
        _store(w, name, arr, outtype_v, report, quantizable)

    n_patches = (vp.image_size // vp.patch_size) ** 2
    h = vp.hidden
    put("v.patch_embd.weight", get("embeddings.patch_embedding.weight"), (h, 3, vp.patch_size, vp.patch_size))
    if has("embeddings.patch_embedding.bias"):
        put("v.patch_embd.bias", get("embeddings.patch_embedding.bias"), (h,))
    has_cls = has("embeddings.class_embedding")
    if has_cls:
        put("v.class_embd", get("embeddings.class_embedding"), (h,))
    put("v.position_embd.weight", get("embeddings.position_embedding.weight"), (n_patches + int(has_cls), h))
    if has("pre_layrnorm.weight"):
        put("v.pre_ln.weight", get("pre_layrnorm.weight"), (h,))
        put("v.pre_ln.bias", get("pre_layrnorm.bias"), (h,))
    for i in range(fl):  # layers past the feature layer are never run: leave them out
        for hf, gg in _VISION_LAYER.items():
            for kind in ("weight", "bias"):
                arr = get(f"encoder.layers.{i}.{hf}.{kind}")
                put(f"v.blk.{i}.{gg}.{kind}", arr)
    put("mm.0.weight", get("projector.linear_1.weight"), (mm_out, h))
    put("mm.0.bias", get("projector.linear_1.bias"), (mm_out,))
    put("mm.2.weight", get("projector.linear_2.weight"), (mm_out, mm_out))
    put("mm.2.bias", get("projector.linear_2.bias"), (mm_out,))
    if vp.grid_pinpoints and has("image_newline"):
        # loaded by clip.cpp but not used by its LLaVA graph (see README, LLaVA-1.6); kept so the file is complete
        put("v.image_newline", get("image_newline"), (mm_out,))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return report


def vocab_from_pieces(pieces: Iterable[tuple[str, float, int]], size: int, **special) -> Vocab:
    """Builds a Vocab, padding with unused `[PAD{i}]` tokens up to the embedding rows (as llama.cpp's converter)."""
    tokens, scores, types = [], [], []
    for piece, score, ttype in pieces:
        tokens.append(piece)
        scores.append(float(score))
        types.append(int(ttype))
    if len(tokens) > size:
        raise GGUFWriteError(f"tokenizer has {len(tokens)} tokens, more than the model's {size} embedding rows")
    for i in range(len(tokens), size):
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
    return Vocab(tokens, scores, types, **special)
