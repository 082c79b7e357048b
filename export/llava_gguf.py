"""Hugging Face LLaVA folder -> `llm.gguf` + `mmproj.gguf` + `ecso.json`, with read-back checks.

LLaVA-1.5 (LlavaForConditionalGeneration) and LLaVA-1.6 / LLaVA-NeXT (LlavaNextForConditionalGeneration, "anyres"
tiles: the mmproj gets `clip.vision.image_grid_pinpoints`, which switches mtmd to tiles + overview).

Our own mapping code: llama.cpp's converter rejects llava-hf CLIP towers (its --mmproj path
handles pixtral / mistral3 only) and does not know
LlavaNext at all. Tensors are read lazily from safetensors (bf16/f16/f32) without torch. Output is written to a
temporary folder beside the target and moved in only after the read-back checks pass, so a failed export leaves
nothing half-written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import gguf
import numpy as np

from ecso.export.checksums import sha256_file
from ecso.export.gguf_write import (LLAVA15_TEMPLATE, OUTTYPES, LlmParams, VisionParams, Vocab, vocab_from_pieces,
                                    write_llm, write_mmproj)
from ecso.export.safetensors_io import SafetensorsError, TensorRef, read_index

MANIFEST = "ecso.json"
SUPPORTED_TEXT = ("llama", "mistral")
SUPPORTED_VISION = ("clip_vision_model", "siglip_vision_model")
LLAVA_ARCHS = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration"}
# What llama.cpp's LLaVA-1.6 path does differently from transformers' LlavaNext (measured in tests/test_llava_next.py)
ANYRES_DIFFERENCE = ("llama.cpp lays out a LLaVA-1.6 image as whole tiles then the overview, with no image_newline "
                     "rows and no unpadding; transformers packs the overview first, then the tile grid row by row, "
                     "unpadded, with image_newline closing each row (same per-tile embeddings, different block)")


class ExportError(ValueError):
    """The folder cannot be exported; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    llm: Path
    mmproj: Path
    manifest: Path
    outtype: str
    seconds: float


# Key layouts seen in the wild -> canonical prefixes ("llm." Llama names without "model.", "vision.", "projector.").
_LAYOUTS = [
    (re.compile(r"^language_model\.model\."), "llm."),           # llava-hf classic, transformers 4.x and 5.x
    (re.compile(r"^language_model\.lm_head\."), "llm.lm_head."),
    (re.compile(r"^model\.language_model\."), "llm."),           # transformers >= 4.52 in-memory names
    (re.compile(r"^lm_head\."), "llm.lm_head."),
    (re.compile(r"^(model\.)?vision_tower\.vision_model\."), "vision."),
    (re.compile(r"^(model\.)?vision_tower\."), "vision."),       # transformers 5 drops `vision_model.`
    (re.compile(r"^(model\.)?multi_modal_projector\."), "projector."),
    (re.compile(r"^(model\.)?image_newline$"), "image_newline"),  # LLaVA-1.6
]


def _canonical(name: str) -> str | None:
    for pattern, repl in _LAYOUTS:
        if pattern.search(name):
            return pattern.sub(repl, name, count=1)
    return None


class CheckpointTensors:
    """All tensors of an HF checkpoint by canonical name, loaded on demand."""

    def __init__(self, hf_dir: Path):
        files = sorted(hf_dir.glob("*.safetensors"))
        if not files:
            if list(hf_dir.glob("*.bin")) or list(hf_dir.glob("*.pt")):
                raise ExportError(f"{hf_dir} has only PyTorch .bin weights; re-save it with safetensors "
                                  "(model.save_pretrained(dir, safe_serialization=True)) and export again")
            raise ExportError(f"{hf_dir} has no *.safetensors weights")
        self.refs: dict[str, TensorRef] = {}
        for f in files:
            try:
                index = read_index(f)
            except SafetensorsError as e:
                raise ExportError(str(e)) from None
            for name, ref in index.items():
                canon = _canonical(name)
                if canon is not None:
                    self.refs[canon] = ref

    def has(self, name: str) -> bool:
        return name in self.refs

    def get(self, name: str) -> np.ndarray:
        if name not in self.refs:
            raise ExportError(f"checkpoint is missing tensor {name!r} (is the download complete?)")
        return self.refs[name].load().astype(np.float32)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{path} not found: is this a Hugging Face model folder?") from None
    except json.JSONDecodeError as e:
        raise ExportError(f"{path} is not valid JSON ({e})") from None


def read_llava_config(hf_dir: Path) -> tuple[dict, dict, dict]:
    """Returns (config, text_config, vision_config) after checking that this is a LLaVA we can export."""
    cfg = _read_json(hf_dir / "config.json")
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") not in LLAVA_ARCHS and not set(archs) & set(LLAVA_ARCHS.values()):
        raise ExportError(f"{hf_dir} is not a LLaVA model (model_type={cfg.get('model_type')!r}, "
                          f"architectures={archs}); supported: {', '.join(LLAVA_ARCHS.values())}")
    if is_llava_next(cfg):
        grid_pinpoints(cfg, int((cfg.get("vision_config") or {}).get("image_size", 224)))  # raises if unusable
    text, vision = cfg.get("text_config") or {}, cfg.get("vision_config") or {}
    text_type = text.get("model_type", "llama")
    if text_type not in SUPPORTED_TEXT:
        raise ExportError(f"unsupported language model {text_type!r}; supported: {', '.join(SUPPORTED_TEXT)}")
    if vision.get("model_type") not in SUPPORTED_VISION:
        raise ExportError(f"unsupported vision tower {vision.get('model_type')!r}; "
                          f"supported: {', '.join(SUPPORTED_VISION)}")
    if cfg.get("projector_hidden_act", "gelu") != "gelu":
        raise ExportError(f"unsupported projector activation {cfg.get('projector_hidden_act')!r} (llama.cpp: gelu)")
    if isinstance(cfg.get("vision_feature_layer", -2), list):
        raise ExportError("multi-layer vision features (granite-style) are not supported")
    strategy = cfg.get("vision_feature_select_strategy", "default")
    has_cls = vision["model_type"] == "clip_vision_model"
    if (strategy == "default") != has_cls:
        raise ExportError(f"vision_feature_select_strategy={strategy!r} with a {vision['model_type']} tower is not "
                          "what llama.cpp implements (CLIP drops CLS = 'default'; SigLIP keeps all = 'full')")
    for key in ("rope_scaling",):
        if text.get(key):
            raise ExportError(f"text_config.{key} is set; rope scaling is not supported by this exporter")
    return cfg, text, vision


def is_llava_next(cfg: dict) -> bool:
    return cfg.get("model_type") == "llava_next" or LLAVA_ARCHS["llava_next"] in (cfg.get("architectures") or [])


def grid_pinpoints(cfg: dict, tile: int) -> tuple[tuple[int, int], ...]:
    """LLaVA-1.6's tile resolutions, (height, width) as HF lists them; each side a multiple of the tile, because
    llama.cpp and transformers both cut the resized image into tile x tile squares."""
    raw = cfg.get("image_grid_pinpoints")
    if not raw:
        raise ExportError("a LlavaNext config needs image_grid_pinpoints (the anyres tile resolutions)")
    try:
        pins = tuple((int(h), int(w)) for h, w in raw)
    except (TypeError, ValueError):
        raise ExportError(f"image_grid_pinpoints must be a list of [height, width] pairs, got {raw!r}") from None
    bad = [p for p in pins if min(p) < tile or p[0] % tile or p[1] % tile]
    if bad:
        raise ExportError(f"image_grid_pinpoints {bad} are not multiples of the {tile}px vision tile; "
                          "llama.cpp would cut partial tiles that transformers never makes")
    return pins


def read_spm_vocab(hf_dir: Path, vocab_size: int) -> Vocab:
    """SentencePiece tokenizer.model + HF added tokens -> GGUF vocabulary."""
    model = hf_dir / "tokenizer.model"
    if not model.exists():
        raise ExportError(f"{hf_dir} has no tokenizer.model: only SentencePiece (Llama/Vicuna) tokenizers are "
                          "supported; convert the LLM with llama.cpp's convert_hf_to_gguf.py instead")
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:
        raise ExportError("reading tokenizer.model needs sentencepiece and protobuf: pip install 'ecso[export]'") from None
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(model.read_bytes())
    except Exception as e:  # protobuf raises DecodeError
        raise ExportError(f"{model} is not a SentencePiece model ({e})") from None
    # SentencePiece piece types map 1:1 onto gguf.TokenType (NORMAL=1 UNKNOWN=2 CONTROL=3 USER_DEFINED=4 UNUSED=5 BYTE=6)
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    tok_cfg = {}
    if (hf_dir / "tokenizer_config.json").exists():
        tok_cfg = _read_json(hf_dir / "tokenizer_config.json")
    added: dict[int, str] = {}
    for idx, info in (tok_cfg.get("added_tokens_decoder") or {}).items():
        added[int(idx)] = info["content"]
    if (hf_dir / "added_tokens.json").exists():
        added.update({int(i): t for t, i in _read_json(hf_dir / "added_tokens.json").items()})
    for idx in sorted(added):
        if idx < len(pieces):
            if pieces[idx][0] != added[idx]:
                pieces[idx] = (added[idx], 0.0, int(gguf.TokenType.USER_DEFINED))
        elif idx == len(pieces):
            pieces.append((added[idx], 0.0, int(gguf.TokenType.USER_DEFINED)))
        else:
            raise ExportError(f"added token {added[idx]!r} has id {idx}, leaving a gap after {len(pieces)} tokens")
    norm = proto.normalizer_spec
    return vocab_from_pieces(
        pieces, vocab_size,
        bos_id=proto.trainer_spec.bos_id if proto.trainer_spec.bos_id >= 0 else 1,
        eos_id=proto.trainer_spec.eos_id if proto.trainer_spec.eos_id >= 0 else 2,
        unk_id=max(proto.trainer_spec.unk_id, 0),
        pad_id=proto.trainer_spec.pad_id if proto.trainer_spec.pad_id >= 0 else None,
        add_bos=bool(tok_cfg.get("add_bos_token", True)),
        add_space_prefix=bool(norm.add_dummy_prefix) if norm.HasField("add_dummy_prefix") else True,
    )


def _vision_params(cfg: dict, vision: dict, text: dict, hf_dir: Path) -> VisionParams:
    pre = {}
    if (hf_dir / "preprocessor_config.json").exists():
        pre = _read_json(hf_dir / "preprocessor_config.json")
    siglip = vision["model_type"] == "siglip_vision_model"
    default_mean = [0.5] * 3 if siglip else [0.48145466, 0.4578275, 0.40821073]
    default_std = [0.5] * 3 if siglip else [0.26862954, 0.26130258, 0.27577711]
    act = vision.get("hidden_act", "gelu_pytorch_tanh" if siglip else "quick_gelu")
    if act not in ("quick_gelu", "gelu", "gelu_pytorch_tanh", "gelu_new"):
        raise ExportError(f"unsupported vision activation {act!r}")
    return VisionParams(
        image_size=int(vision.get("image_size", 224)), patch_size=int(vision.get("patch_size", 14)),
        hidden=int(vision["hidden_size"]), ffn=int(vision["intermediate_size"]),
        heads=int(vision["num_attention_heads"]), layers=int(vision["num_hidden_layers"]),
        feature_layer=int(cfg.get("vision_feature_layer", -2)), projection_dim=int(text["hidden_size"]),
        image_mean=tuple(pre.get("image_mean", default_mean)), image_std=tuple(pre.get("image_std", default_std)),
        use_gelu=act != "quick_gelu", eps=float(vision.get("layer_norm_eps", 1e-5)),
        name=f"{hf_dir.name}-mmproj",
        grid_pinpoints=grid_pinpoints(cfg, int(vision.get("image_size", 224))) if is_llava_next(cfg) else (),
    )


def _llm_params(text: dict, hf_dir: Path) -> LlmParams:
    rope = text.get("rope_theta") or (text.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    hidden, heads = int(text["hidden_size"]), int(text["num_attention_heads"])
    if text.get("head_dim") not in (None, hidden // heads):
        raise ExportError("text_config.head_dim differs from hidden_size/num_attention_heads; not supported")
    return LlmParams(
        vocab_size=int(text["vocab_size"]), hidden=hidden, ffn=int(text["intermediate_size"]),
        layers=int(text["num_hidden_layers"]), heads=heads,
        kv_heads=int(text.get("num_key_value_heads") or heads),
        context_length=int(text.get("max_position_embeddings", 4096)), rope_theta=float(rope),
        rms_eps=float(text.get("rms_norm_eps", 1e-5)), name=f"{hf_dir.name}-llm",
    )


def _read_back(llm: Path, mmproj: Path, hp: LlmParams, vp: VisionParams) -> None:
    """Re-opens both files with gguf's reader and checks what llama.cpp will look at first."""
    r = gguf.GGUFReader(str(llm))
    arch = r.get_field("general.architecture").contents()
    n_tensors = len(r.tensors)
    if arch != "llama" or n_tensors != 3 + 9 * hp.layers:
        raise ExportError(f"read-back of {llm.name} failed: arch={arch}, {n_tensors} tensors")
    if r.get_field("llama.embedding_length").contents() != hp.hidden:
        raise ExportError(f"read-back of {llm.name}: embedding_length mismatch")
    m = gguf.GGUFReader(str(mmproj))
    if m.get_field("general.architecture").contents() != "clip":
        raise ExportError(f"read-back of {mmproj.name}: not a clip file")
    if m.get_field("clip.vision.projection_dim").contents() != hp.hidden:
        raise ExportError(f"read-back of {mmproj.name}: projection_dim does not match the LLM")
    names = {t.name for t in m.tensors}
    for need in ("v.patch_embd.weight", "v.position_embd.weight", "mm.0.weight", "mm.2.weight"):
        if need not in names:
            raise ExportError(f"read-back of {mmproj.name}: tensor {need} missing")
    if any(n.startswith("v.post_ln") for n in names):
        raise ExportError(f"read-back of {mmproj.name}: v.post_ln must not be written")
    if vp.gguf_feature_layer != m.get_field("clip.vision.block_count").contents():
        raise ExportError(f"read-back of {mmproj.name}: block_count mismatch")
    pins = m.get_field("clip.vision.image_grid_pinpoints")
    written = pins.contents() if pins is not None else []
    if written != [v for h, w in vp.grid_pinpoints for v in (w, h)]:
        raise ExportError(f"read-back of {mmproj.name}: image_grid_pinpoints {written} do not match the config")


def export_llava(hf_dir: Path | str, out_dir: Path | str, outtype: str = "f32", overwrite: bool = False) -> ExportResult:
    """Exports an HF LLaVA folder to `out_dir/{llm.gguf, mmproj.gguf, ecso.json}`."""
    import time

    t0 = time.perf_counter()
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if outtype not in OUTTYPES:
        raise ExportError(f"--outtype must be one of {', '.join(OUTTYPES)}")
    if not hf_dir.is_dir():
        raise ExportError(f"{hf_dir} is not a folder")
    targets = [out_dir / "llm.gguf", out_dir / "mmproj.gguf", out_dir / MANIFEST]
    if not overwrite and any(t.exists() for t in targets):
        raise ExportError(f"{out_dir} already holds an export; pass --force to replace it")
    cfg, text, vision = read_llava_config(hf_dir)
    hp = _llm_params(text, hf_dir)
    vp = _vision_params(cfg, vision, text, hf_dir)
    vocab = read_spm_vocab(hf_dir, hp.vocab_size)
    weights = CheckpointTensors(hf_dir)
    if not weights.has("llm.lm_head.weight") and (text.get("tie_word_embeddings") or cfg.get("tie_word_embeddings")):
        weights.refs["llm.lm_head.weight"] = weights.refs["llm.embed_tokens.weight"]

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        llm_rep = write_llm(tmp / "llm.gguf", hp, vocab, lambda n: weights.get("llm." + n), outtype,
                            chat_template=LLAVA15_TEMPLATE)
        top_level = lambda n: n if n.startswith("projector.") or n == "image_newline" else "vision." + n  # noqa: E731
        mm_rep = write_mmproj(tmp / "mmproj.gguf", vp, lambda n: weights.get(top_level(n)),
                              lambda n: weights.has(top_level(n)), outtype)
        _read_back(tmp / "llm.gguf", tmp / "mmproj.gguf", hp, vp)
        manifest = {
            "format": "ecso-export/1",
            "source": str(hf_dir.resolve()),
            "source_config_sha256": sha256_file(hf_dir / "config.json"),
            "outtype": outtype,
            "chat_format": "llava-1.5",
            "architecture": LLAVA_ARCHS["llava_next" if vp.grid_pinpoints else "llava"],
            "image_tokens": (vp.image_size // vp.patch_size) ** 2,  # per tile for LLaVA-1.6
            "image_grid_pinpoints": [list(p) for p in vp.grid_pinpoints],
            "llm": {"file": "llm.gguf", "params": asdict(hp), "tensor_types": llm_rep.tensor_types,
                    "sha256": sha256_file(tmp / "llm.gguf")},
            "mmproj": {"file": "mmproj.gguf", "params": asdict(vp), "tensor_types": mm_rep.tensor_types,
                       "tower": vision["model_type"], "sha256": sha256_file(tmp / "mmproj.gguf")},
            "known_issues": (["llama.cpp CLIP CLS-token order (ggml-org/llama.cpp#25814): image embeddings of "
                              "CLIP towers differ from transformers"] if vision["model_type"] == "clip_vision_model"
                             else []) + ([ANYRES_DIFFERENCE] if vp.grid_pinpoints else []),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        out_dir.mkdir(parents=True, exist_ok=True)
        for t in targets:
            os.replace(tmp / t.name, t)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(out_dir, targets[0], targets[1], targets[2], outtype, time.perf_counter() - t0)
