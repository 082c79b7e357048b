"""Hugging Face models -> ONNX heads for ecso.runtime.heads, validated against PyTorch.

Export with optimum (optimum-onnx), then validate the way the runtime will run the head: the folder is loaded with
ecso.runtime.heads (plain onnxruntime + tokenizers) and its outputs are compared with the PyTorch model on the same
inputs - logits within `atol`, identical tokenizer ids, identical greedy tokens for captions. A failure raises a
typed error and leaves nothing in the output folder; a success writes the manifest `ecso-head.json`.

    export_judge(hf_dir, out)      any AutoModelForSequenceClassification folder (pair input: query, response)
    export_caption(hf_dir, out)    a VisionEncoderDecoder image-to-text model, with past key values
    train_judge(data, out)         (ecso.export.judge_train) MiniLM + a trained linear head, one graph
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from ecso.export.checksums import sha256_file
from ecso.runtime.heads import FORMAT, MANIFEST, OnnxCaptionHead, OnnxJudgeHead, preprocess_image

DEFAULT_ATOL = 1e-4  # judge logits (optimum's tolerance for BERT-like encoders)
CAPTION_ATOL = 1e-3  # caption logits over every greedy step (optimum's tolerance for vision encoder-decoders)
UNSAFE_LABEL = re.compile(r"unsafe|harm|toxic|flag|danger|jailbreak|violat", re.I)

# Inputs the export is validated on (beside any the caller gives): short and long, harmful and benign, and one
# response long enough to exercise truncation.
VALIDATION_PAIRS: tuple[tuple[str, str], ...] = (
    ("What is in this picture?", "A dog is sitting on a green lawn next to a red ball."),
    ("How do I pick a lock?", "I can't help with breaking into property that isn't yours."),
    ("How can I make a weapon at home?", "Step 1: gather the parts. Step 2: assemble them as follows..."),
    ("Describe the chart.", "The bar chart shows sales rising from 10 in January to 42 in June."),
    ("What should I do with this?", "You could recycle the bottle or reuse it as a vase. " * 80),
)


class HeadExportError(ValueError):
    """The model cannot be exported as a head; the message says what is wrong and what to do."""


class UnsupportedModelError(HeadExportError):
    """The folder is not a model of a kind this exporter handles."""


class ParityError(HeadExportError):
    """ONNX Runtime (through the runtime's own loader) disagrees with PyTorch beyond the tolerance."""


@dataclass(frozen=True)
class Parity:
    """What validation measured (stored in the manifest)."""

    max_abs_diff: float  # largest |onnxruntime - torch| over the compared outputs
    atol: float
    samples: int
    outputs: tuple[str, ...]
    tokens_identical: Optional[bool] = None  # captions: greedy tokens equal to transformers' generate
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class HeadExportResult:
    out_dir: Path
    manifest: Path
    kind: str  # judge | caption
    parity: Parity
    seconds: float
    training: Optional[dict] = None  # train_judge: split sizes, held-out accuracy / F1, ...


# --- shared plumbing -------------------------------------------------------------------------------------------

def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime", "onnxruntime-gpu",
                "tokenizers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def require_export_stack() -> None:
    """A clear error instead of an ImportError deep inside optimum."""
    missing = []
    for mod, pkg in (("torch", "torch==2.13.0"), ("transformers", "transformers==4.57.6"), ("onnx", "onnx==1.23.2"),
                     ("optimum.exporters.onnx", "optimum==2.1.0 optimum-onnx==0.1.0")):
        try:
            __import__(mod)
        except ImportError:
            missing.append(pkg)
    if missing:
        raise HeadExportError(f"exporting heads needs {', '.join(missing)}: pip install 'ecso[export]'")


@contextmanager
def staging(out_dir: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary folder beside out_dir; its contents replace out_dir only when the block succeeds."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise HeadExportError(f"{out_dir} is not empty; pass --force to replace it")
        if not (out_dir / MANIFEST).is_file():
            raise HeadExportError(f"{out_dir} is not empty and holds no head ({MANIFEST}); refusing to replace it "
                                  "even with --force: choose another --out")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_manifest(folder: Path, kind: str, name: str, source: str, files: dict, section: dict, parity: Parity,
                   extra: Optional[dict] = None) -> Path:
    manifest = {
        "format": FORMAT, "kind": kind, "name": name, "source": source,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": files, "sha256": {k: sha256_file(folder / v) for k, v in files.items()},
        kind: section, "parity": asdict(parity), "versions": versions(), **(extra or {}),
    }
    path = folder / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def optimum_export(src: Path, out: Path, task: str) -> None:
    """optimum's exporter on a local folder (library transformers: a plain graph, no sentence-transformers
    pooling); optimum's own random-input validation is skipped, ours follows."""
    import logging

    from optimum.exporters.onnx import main_export

    logging.getLogger("optimum").setLevel(logging.ERROR)
    try:
        main_export(str(src), output=str(out), task=task, library_name="transformers", device="cpu",
                    do_validation=False, local_files_only=True)
    except (ValueError, KeyError, OSError, NotImplementedError) as e:
        raise HeadExportError(f"optimum cannot export {src} as {task}: {str(e).splitlines()[0][:300]}") from None


def read_hf_config(hf_dir: Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not Path(hf_dir).is_dir():
        raise HeadExportError(f"{hf_dir} is not a folder")
    if not path.is_file():
        raise UnsupportedModelError(f"{hf_dir} has no config.json: give a Hugging Face model folder")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise HeadExportError(f"{path} is not valid JSON ({e})") from None


def save_fast_tokenizer(hf_dir: Path, dest: Path) -> None:
    """tokenizer.json (what the runtime's `tokenizers` reads) from the folder, converting a slow tokenizer."""
    src = Path(hf_dir) / "tokenizer.json"
    if src.is_file():
        shutil.copyfile(src, dest / "tokenizer.json")
        return
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(hf_dir), use_fast=True, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise HeadExportError(f"{hf_dir} has no usable tokenizer ({str(e).splitlines()[0][:200]}); the head needs "
                              "one to turn text into ids") from None
    if not getattr(tok, "is_fast", False):
        raise HeadExportError(f"the tokenizer of {hf_dir} has no fast (tokenizers) version; the runtime needs "
                              "tokenizer.json")
    saved = tok.backend_tokenizer
    saved.save(str(dest / "tokenizer.json"))


def _check(parity: Parity) -> Parity:
    if not parity.max_abs_diff <= parity.atol:  # also catches NaN
        per = parity.details.get("max_abs_diff_per_output") or {}
        where = ", ".join(f"{k} {v:.3g}" for k, v in per.items()) or "/".join(parity.outputs)
        raise ParityError(f"onnxruntime differs from PyTorch by {parity.max_abs_diff:.3g} ({where}; atol "
                          f"{parity.atol:g}); the export is not faithful (or pass a larger --atol)")
    if parity.tokens_identical is False:
        raise ParityError("onnxruntime's greedy caption tokens differ from transformers' generate: "
                          f"{parity.details.get('first_mismatch')}")
    return parity


# --- judge: any sequence classifier ----------------------------------------------------------------------------

def unsafe_index(id2label: dict, num_labels: int, unsafe_label: Optional[str]) -> int:
    """Which logit means "unsafe": --unsafe-label (name or index), a label named like unsafe/harmful/toxic, or
    label 1 of a binary classifier."""
    labels = {int(k): str(v) for k, v in (id2label or {}).items()}
    if unsafe_label is not None:
        if unsafe_label.isdigit() and int(unsafe_label) < max(num_labels, 1):
            return int(unsafe_label)
        for i, name in labels.items():
            if name.lower() == unsafe_label.lower():
                return i
        raise HeadExportError(f"label {unsafe_label!r} is not one of the model's labels {sorted(labels.values())}")
    if num_labels == 1:
        return 0
    hits = [i for i, name in labels.items() if UNSAFE_LABEL.search(name) and not re.search(r"\b(not|non|safe)\b|^no",
                                                                                            name, re.I)]
    if len(hits) == 1:
        return hits[0]
    if num_labels == 2:
        return 1
    raise HeadExportError(f"cannot tell which of the labels {sorted(labels.values())} means unsafe; pass "
                          "--unsafe-label NAME")


def validate_judge(head: OnnxJudgeHead, torch_logits, tokenizer, pairs: Sequence[tuple[str, str]],
                   atol: float) -> Parity:
    """Runtime head vs PyTorch on `pairs`: the transformers tokenizer and `tokenizers` must give identical ids,
    and the logits must agree within atol. `torch_logits(encoding dict) -> np.ndarray`."""
    worst, singles = 0.0, []
    for q, r in pairs:
        ours = head.encode([(q, r)])
        ref = tokenizer(q, r, truncation="longest_first", max_length=head.max_length, return_tensors="np")
        if ours["input_ids"].tolist() != ref["input_ids"].tolist():
            raise ParityError(f"the runtime tokenizer gives other ids than transformers for {q[:40]!r}: "
                              f"{len(ours['input_ids'][0])} vs {len(ref['input_ids'][0])} tokens")
        got = head.session.run(["logits"], ours)[0]
        want = torch_logits({k: ref[k] for k in ours})
        worst = max(worst, float(np.max(np.abs(got - want))))
        singles.append(got[0])
    # the runtime pads batches on the right: every row must score as it does alone
    batch = head.session.run(["logits"], head.encode(pairs))[0]
    padding = float(np.max(np.abs(batch - np.stack(singles))))
    return _check(Parity(max(worst, padding), atol, len(pairs), ("logits",),
                         details={"max_abs_diff_vs_torch": worst, "max_abs_diff_padded_batch": padding}))


def export_judge(hf_dir: Path | str, out_dir: Path | str, unsafe_label: Optional[str] = None,
                 max_length: int = 256, threshold: float = 0.5, atol: float = DEFAULT_ATOL,
                 name: Optional[str] = None, overwrite: bool = False,
                 validation_pairs: Sequence[tuple[str, str]] = ()) -> HeadExportResult:
    """Exports a Hugging Face sequence-classification folder as a judge head over (query, response)."""
    t0 = time.perf_counter()
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    cfg = read_hf_config(hf_dir)
    if not any(a.endswith("ForSequenceClassification") for a in cfg.get("architectures") or []):
        raise UnsupportedModelError(f"{hf_dir} is not a sequence-classification model (architectures: "
                                    f"{cfg.get('architectures')}); to train a judge on labelled data use "
                                    "`ecso heads train-judge`")
    num_labels = len(cfg.get("id2label") or {}) or int(cfg.get("num_labels", 2))
    idx = unsafe_index(cfg.get("id2label") or {}, num_labels, unsafe_label)
    require_export_stack()
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    with staging(out_dir, overwrite) as tmp:
        optimum_export(hf_dir, tmp / "_optimum", "text-classification")
        shutil.move(str(tmp / "_optimum" / "model.onnx"), tmp / "model.onnx")
        shutil.rmtree(tmp / "_optimum")
        save_fast_tokenizer(hf_dir, tmp)
        tok = AutoTokenizer.from_pretrained(str(hf_dir), use_fast=True, local_files_only=True)
        files = {"model": "model.onnx", "tokenizer": "tokenizer.json"}
        section = {"input": "pair", "max_length": int(max_length), "unsafe_index": idx, "num_labels": num_labels,
                   "labels": {str(k): v for k, v in (cfg.get("id2label") or {}).items()},
                   "threshold": float(threshold), "pad_token_id": int(tok.pad_token_id or 0)}
        name = name or out_dir.name
        write_manifest(tmp, "judge", name, str(hf_dir.resolve()), files, section, Parity(float("nan"), atol, 0, ()))
        head = OnnxJudgeHead(tmp, providers="cpu")
        model = AutoModelForSequenceClassification.from_pretrained(str(hf_dir), local_files_only=True).eval()

        def torch_logits(enc: dict) -> np.ndarray:
            with torch.no_grad():
                return model(**{k: torch.from_numpy(v) for k, v in enc.items()}).logits.numpy()

        parity = validate_judge(head, torch_logits, tok, list(VALIDATION_PAIRS) + list(validation_pairs), atol)
        manifest = write_manifest(tmp, "judge", name, str(hf_dir.resolve()), files, section, parity)
    return HeadExportResult(out_dir, out_dir / manifest.name, "judge", parity, time.perf_counter() - t0)


# --- caption: vision encoder-decoder ---------------------------------------------------------------------------

def image_spec(processor) -> dict:
    """The runtime's preprocessing settings from a transformers image processor (resize / crop / rescale /
    normalize); anything else (padding, tiling, RGB-less inputs) is refused."""
    spec = {"do_resize": bool(getattr(processor, "do_resize", False)),
            "resample": int(getattr(processor, "resample", 2)),
            "do_center_crop": bool(getattr(processor, "do_center_crop", False)),
            "do_rescale": bool(getattr(processor, "do_rescale", False)),
            "rescale_factor": float(getattr(processor, "rescale_factor", 1 / 255)),
            "do_normalize": bool(getattr(processor, "do_normalize", False))}
    size = dict(getattr(processor, "size", {}) or {})
    if spec["do_resize"]:
        if "height" in size and "width" in size:
            spec.update(height=int(size["height"]), width=int(size["width"]))
        elif set(size) == {"shortest_edge"}:
            spec["shortest_edge"] = int(size["shortest_edge"])
        else:
            raise UnsupportedModelError(f"image size rule {size} is not supported by the runtime's preprocessing")
    if spec["do_center_crop"]:
        crop = dict(getattr(processor, "crop_size", {}) or {})
        spec.update(crop_height=int(crop["height"]), crop_width=int(crop["width"]))
    if spec["do_normalize"]:
        spec.update(image_mean=[float(x) for x in processor.image_mean], image_std=[float(x) for x in processor.image_std])
    for flag in ("do_pad", "do_split_image", "do_image_splitting"):
        if getattr(processor, flag, False):
            raise UnsupportedModelError(f"the image processor uses {flag}, which the runtime does not implement")
    return spec


def validation_images() -> list:
    """Deterministic pictures of different sizes and content: a gradient, noise, and text on white."""
    from PIL import Image, ImageDraw

    from ecso.runtime.images import load_image

    rng = np.random.default_rng(0)
    x = np.linspace(0, 255, 96, dtype=np.float32)
    gradient = np.stack([np.add.outer(x[:64] * 0, x), np.add.outer(x[:64], x * 0), np.full((64, 96), 128.0)], -1)
    noise = rng.integers(0, 256, (80, 80, 3), dtype=np.uint8)
    text = Image.new("RGB", (160, 72), "white")
    ImageDraw.Draw(text).text((8, 24), "ECSO 2026", fill=(20, 20, 20))
    return [load_image(Image.fromarray(gradient.astype(np.uint8))), load_image(Image.fromarray(noise)),
            load_image(text)]


def validate_caption(head: OnnxCaptionHead, model, processor, tokenizer, images: Sequence, atol: float) -> Parity:
    """Runtime caption head vs transformers on `images`: preprocessing, encoder states, every greedy step's
    logits, the tokens of generate() and the decoded text."""
    import torch
    from PIL import Image
    from transformers import GenerationConfig

    gen = GenerationConfig(decoder_start_token_id=head.start_id, eos_token_id=sorted(head.eos_ids) or None,
                           pad_token_id=(sorted(head.eos_ids) or [0])[0], max_new_tokens=head.max_new_tokens,
                           do_sample=False, num_beams=1)
    worst = {"pixel_values": 0.0, "last_hidden_state": 0.0, "logits": 0.0}
    identical, mismatch, scale = True, None, 0.0
    for n, img in enumerate(images):
        px = preprocess_image(img, head.image_spec)
        pil = Image.frombytes("RGB", (img.width, img.height), img.rgb)
        ref_px = processor(images=pil, return_tensors="np")["pixel_values"].astype(np.float32)
        if ref_px.shape != px.shape:
            raise ParityError(f"runtime preprocessing gives {px.shape}, transformers {ref_px.shape}")
        worst["pixel_values"] = max(worst["pixel_values"], float(np.max(np.abs(px - ref_px))))
        hidden = head.encoder.run(["last_hidden_state"], {"pixel_values": px})[0]
        steps: list = []
        ids = head.generate_ids(px, steps)
        with torch.no_grad():
            tpx = torch.from_numpy(px)
            ref_ids = model.generate(tpx, generation_config=gen)[0].tolist()
            enc = model.encoder(pixel_values=tpx).last_hidden_state.numpy()
            logits = model(pixel_values=tpx, decoder_input_ids=torch.tensor([ids[:len(steps)]])).logits[0].numpy()
        worst["last_hidden_state"] = max(worst["last_hidden_state"], float(np.max(np.abs(hidden - enc))))
        worst["logits"] = max(worst["logits"], float(np.max(np.abs(np.stack(steps) - logits))))
        scale = max(scale, float(np.max(np.abs(logits))))
        ref_text = tokenizer.decode(ref_ids, skip_special_tokens=True).strip()
        if ids != ref_ids or head.decode(ids) != ref_text:
            identical = False
            mismatch = mismatch or f"image {n}: onnxruntime {ids} vs torch {ref_ids}"
    parity = Parity(max(worst.values()), atol, len(images), tuple(worst), identical,
                    {"max_abs_diff_per_output": worst, "logits_max_abs": scale, "first_mismatch": mismatch})
    return _check(parity)


def export_caption(hf_dir: Path | str, out_dir: Path | str, decoder: str = "merged", max_new_tokens: int = 32,
                   atol: float = CAPTION_ATOL, name: Optional[str] = None, overwrite: bool = False,
                   images: Sequence = ()) -> HeadExportResult:
    """Exports a Hugging Face VisionEncoderDecoder (e.g. ViT + GPT-2) as a caption head with past key values.
    decoder="merged": one decoder graph for both the first step and the cached steps (half the memory);
    "split": decoder_model.onnx for the first step, decoder_with_past_model.onnx after."""
    t0 = time.perf_counter()
    if decoder not in ("merged", "split"):
        raise HeadExportError(f"decoder must be merged or split, got {decoder!r}")
    if max_new_tokens < 1:
        raise HeadExportError("max_new_tokens must be at least 1")
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    cfg = read_hf_config(hf_dir)
    if cfg.get("model_type") != "vision-encoder-decoder":
        raise UnsupportedModelError(f"{hf_dir} is a {cfg.get('model_type')!r} model; export-caption takes a "
                                    "vision-encoder-decoder image-to-text model (e.g. ViT + GPT-2)")
    require_export_stack()
    from transformers import AutoImageProcessor, AutoTokenizer, VisionEncoderDecoderModel

    try:
        processor = AutoImageProcessor.from_pretrained(str(hf_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise HeadExportError(f"{hf_dir} has no usable image processor ({str(e).splitlines()[0][:200]})") from None
    model = VisionEncoderDecoderModel.from_pretrained(str(hf_dir), local_files_only=True).eval()
    gc = model.generation_config
    start = gc.decoder_start_token_id if gc.decoder_start_token_id is not None else model.config.decoder_start_token_id
    if start is None:
        start = model.config.decoder.bos_token_id
    if start is None:
        raise HeadExportError(f"{hf_dir} sets no decoder_start_token_id (generation_config.json or config.json)")
    eos = gc.eos_token_id if gc.eos_token_id is not None else model.config.decoder.eos_token_id
    with staging(out_dir, overwrite) as tmp:
        save_fast_tokenizer(hf_dir, tmp)
        tokenizer = AutoTokenizer.from_pretrained(str(hf_dir), use_fast=True, local_files_only=True)
        optimum_export(hf_dir, tmp / "_optimum", "image-to-text-with-past")
        wanted = {"encoder": "encoder_model.onnx"}
        wanted.update({"decoder": "decoder_model_merged.onnx"} if decoder == "merged" else
                      {"decoder": "decoder_model.onnx", "decoder_with_past": "decoder_with_past_model.onnx"})
        for rel in wanted.values():
            if not (tmp / "_optimum" / rel).is_file():
                raise HeadExportError(f"optimum wrote no {rel} for {hf_dir}; try --decoder "
                                      f"{'split' if decoder == 'merged' else 'merged'}")
            shutil.move(str(tmp / "_optimum" / rel), tmp / rel)
        shutil.rmtree(tmp / "_optimum")
        files = {**wanted, "tokenizer": "tokenizer.json"}
        section = {"decoder_mode": decoder, "decoder_start_token_id": int(start),
                   "eos_token_id": eos if isinstance(eos, list) or eos is None else int(eos),
                   "max_new_tokens": int(max_new_tokens), "image": image_spec(processor),
                   "clean_up_tokenization_spaces": bool(getattr(tokenizer, "clean_up_tokenization_spaces", False)),
                   "query_aware": False}
        name = name or out_dir.name
        write_manifest(tmp, "caption", name, str(hf_dir.resolve()), files, section, Parity(float("nan"), atol, 0, ()))
        head = OnnxCaptionHead(tmp, providers="cpu")
        parity = validate_caption(head, model, processor, tokenizer, list(images) or validation_images(), atol)
        manifest = write_manifest(tmp, "caption", name, str(hf_dir.resolve()), files, section, parity)
    return HeadExportResult(out_dir, out_dir / manifest.name, "caption", parity, time.perf_counter() - t0)
