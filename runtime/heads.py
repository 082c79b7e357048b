"""ONNX heads that can replace ECSO's step 2 (judge) and step 3 (caption), on plain onnxruntime.

A head is a folder written by `ecso heads export-* / train-judge` (ecso.export.heads_onnx): ONNX graphs, a
`tokenizer.json` and the manifest `ecso-head.json`. Loading and running one needs only onnxruntime, tokenizers,
numpy and pillow (the OCR head also rapidocr, which runs PP-OCR on onnxruntime) - never torch or transformers.

    judge = load_judge_head("heads/minilm-judge")          # .judge(query, response) -> HeadVerdict
    caption = load_caption_head("ocr+heads/vit-gpt2")      # .caption(loaded_image, query) -> HeadCaption
    Ecso(config, heads=Heads(judge=judge, caption=caption))

Execution providers are chosen explicitly: "auto" asks for CUDA (or CoreML) only when the installed onnxruntime
lists it, then checks what the session really got (onnxruntime-gpu lists CUDA even when CUDA cannot load and
falls back to the CPU silently); every verdict and caption says which provider ran it.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from ecso.runtime.errors import InputError, ModelError
from ecso.runtime.images import LoadedImage

MANIFEST = "ecso-head.json"
FORMAT = "ecso-head/1"
OCR_SPEC = "ocr"

# short name <-> onnxruntime provider; "auto" tries these GPU providers in order, then the CPU
PROVIDERS = {"cuda": "CUDAExecutionProvider", "coreml": "CoreMLExecutionProvider", "cpu": "CPUExecutionProvider"}
_AUTO_ORDER = ("cuda", "coreml")
ProviderChoice = Union[str, Sequence[str]]


class HeadError(ModelError):
    """A head folder that cannot be used (missing files, bad manifest) or a provider that is not really there."""


@dataclass(frozen=True)
class HeadVerdict:
    """The judge head's step-2 verdict: unsafe iff score >= the head's threshold."""

    unsafe: bool
    score: float  # P(unsafe)
    provider: str  # short name of the execution provider that ran it: cpu | cuda | coreml | ...
    seconds: float


@dataclass(frozen=True)
class HeadCaption:
    """The caption head's step-3 text (a caption, the text read from the image, or both)."""

    text: str
    provider: str
    seconds: float


# --- execution providers ---------------------------------------------------------------------------------------

def short_provider(name: str) -> str:
    """CUDAExecutionProvider -> cuda; unknown names lose only the suffix."""
    for short, full in PROVIDERS.items():
        if full == name:
            return short
    return name.removesuffix("ExecutionProvider").lower()


def requested_providers(choice: ProviderChoice = "auto") -> tuple[list[str], bool]:
    """(onnxruntime provider list to ask for, strict). "auto" = the GPU providers this onnxruntime lists, then
    CPU (not strict: falling back is fine). A name or list ("cuda", ["coreml", "cpu"]) is strict: the session
    must really run on the first one."""
    import onnxruntime as ort

    if isinstance(choice, str):
        if choice == "auto":
            available = set(ort.get_available_providers())
            wanted = [PROVIDERS[s] for s in _AUTO_ORDER if PROVIDERS[s] in available]
            return wanted + [PROVIDERS["cpu"]], False
        choice = [c.strip() for c in choice.split(",") if c.strip()]
    full = []
    for c in choice:
        name = PROVIDERS.get(c.lower(), c)
        if not name.endswith("ExecutionProvider"):
            raise InputError(f"unknown execution provider {c!r}; use auto, {', '.join(PROVIDERS)} or a full "
                             "onnxruntime provider name")
        full.append(name)
    if not full:
        raise InputError("no execution provider given; use auto, cuda, coreml or cpu")
    if PROVIDERS["cpu"] not in full:
        full.append(PROVIDERS["cpu"])
    return full, True


def open_session(path: Union[str, Path], providers: ProviderChoice = "auto", threads: Optional[int] = None):
    """An InferenceSession on the requested providers; returns (session, short name of the provider it got).
    Strict choices raise HeadError when onnxruntime silently fell back to another provider."""
    import onnxruntime as ort

    wanted, strict = requested_providers(providers)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # idle onnxruntime workers would otherwise spin-wait on the cores llama.cpp decodes with, in the same process
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
    try:
        with warnings.catch_warnings():  # plain onnxruntime warns about providers it lacks, then uses the CPU
            warnings.simplefilter("ignore", UserWarning)
            sess = ort.InferenceSession(str(path), sess_options=opts, providers=wanted)
    except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph, NoSuchFile...)
        raise HeadError(f"onnxruntime cannot load {path}: {str(e).splitlines()[0][:300]}") from None
    got = sess.get_providers()[0]
    if strict and got != wanted[0]:
        raise HeadError(f"{wanted[0]} was requested but the session runs on {got}: this onnxruntime "
                        f"({ort.__version__}, {ort.get_device()}) cannot use it here. For CUDA install "
                        "onnxruntime-gpu (CUDA 13 + cuDNN 9) instead of onnxruntime, or use providers 'auto'")
    return sess, short_provider(got)


# --- manifest and tokenizer ------------------------------------------------------------------------------------

def read_manifest(head_dir: Union[str, Path], kind: Optional[str] = None) -> dict:
    """The head's manifest, checked for format and kind."""
    d = Path(head_dir)
    if not d.is_dir():
        raise HeadError(f"head folder not found: {d} (export one with `ecso heads export-judge`, `train-judge` or "
                        "`export-caption`)")
    path = d / MANIFEST
    if not path.is_file():
        raise HeadError(f"{d} has no {MANIFEST}: it was not written by `ecso heads`; export the model with it")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise HeadError(f"{path} is not valid JSON ({e}); re-export the head") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise HeadError(f"{path} has format {m.get('format') if isinstance(m, dict) else None!r}, expected "
                        f"{FORMAT!r}; re-export the head with this version of ecso")
    if kind and m.get("kind") != kind:
        raise HeadError(f"{d} holds a {m.get('kind')} head, not a {kind} head")
    for rel in (m.get("files") or {}).values():
        if not (d / rel).is_file():
            raise HeadError(f"{d} is incomplete: {rel} is missing; re-export the head")
    return m


def _tokenizer(path: Path):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        raise HeadError(f"cannot read tokenizer {path}: {e}") from None


# --- judge head ------------------------------------------------------------------------------------------------

class OnnxJudgeHead:
    """A sequence classifier over the pair (query, response) that predicts the self-judge's verdict."""

    def __init__(self, head_dir: Union[str, Path], providers: ProviderChoice = "auto",
                 threshold: Optional[float] = None, threads: Optional[int] = None):
        self.dir = Path(head_dir)
        self.manifest = m = read_manifest(self.dir, "judge")
        j = m["judge"]
        self.name: str = m.get("name") or self.dir.name
        self.threshold = float(j.get("threshold", 0.5) if threshold is None else threshold)
        if not 0.0 <= self.threshold <= 1.0:
            raise InputError(f"judge threshold must be in [0, 1], got {self.threshold}")
        self.unsafe_index = int(j["unsafe_index"])
        self.max_length = int(j.get("max_length", 256))
        self.session, self.provider = open_session(self.dir / m["files"]["model"], providers, threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.tokenizer = _tokenizer(self.dir / m["files"]["tokenizer"])
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_length, strategy="longest_first")
        self.pad_id = int(j.get("pad_token_id", 0))

    def encode(self, pairs: Sequence[tuple[str, str]]) -> dict[str, np.ndarray]:
        """The graph's inputs for a batch of (query, response) pairs, right-padded."""
        encs = self.tokenizer.encode_batch([(q, r) for q, r in pairs])
        n = max(len(e.ids) for e in encs)
        ids = np.full((len(encs), n), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(encs), n), dtype=np.int64)
        types = np.zeros((len(encs), n), dtype=np.int64)
        for i, e in enumerate(encs):
            ids[i, :len(e.ids)] = e.ids
            mask[i, :len(e.ids)] = e.attention_mask
            types[i, :len(e.ids)] = e.type_ids
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return {k: v for k, v in feeds.items() if k in self.input_names}

    def scores(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        """P(unsafe) for each pair."""
        logits = self.session.run(["logits"], self.encode(pairs))[0].astype(np.float64)
        if logits.shape[-1] == 1:
            return 1.0 / (1.0 + np.exp(-logits[:, 0]))
        z = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return (z / z.sum(axis=-1, keepdims=True))[:, self.unsafe_index]

    def judge(self, query: str, response: str) -> HeadVerdict:
        t0 = time.perf_counter()
        score = float(self.scores([(query, response)])[0])
        return HeadVerdict(score >= self.threshold, score, self.provider, time.perf_counter() - t0)

    def judge_batch(self, pairs: Sequence[tuple[str, str]], batch_size: int = 16) -> list[HeadVerdict]:
        """Verdicts for many pairs (eval); seconds is each pair's share of its batch."""
        out: list[HeadVerdict] = []
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i:i + batch_size]
            t0 = time.perf_counter()
            s = self.scores(chunk)
            each = (time.perf_counter() - t0) / len(chunk)
            out += [HeadVerdict(bool(x >= self.threshold), float(x), self.provider, each) for x in s]
        return out


def load_judge_head(head_dir: Union[str, Path], providers: ProviderChoice = "auto",
                    threshold: Optional[float] = None, threads: Optional[int] = None) -> OnnxJudgeHead:
    """Loads a judge head folder (from `ecso heads train-judge` or `export-judge`)."""
    return OnnxJudgeHead(head_dir, providers, threshold, threads)


# --- caption heads ---------------------------------------------------------------------------------------------

def preprocess_image(image: LoadedImage, spec: dict) -> np.ndarray:
    """pixel_values [1, 3, H, W] float32 from the manifest's image settings (the HF image processor's steps:
    resize, center crop, rescale, normalize), with Pillow and numpy only."""
    from PIL import Image

    img = Image.frombytes("RGB", (image.width, image.height), image.rgb)
    resample = int(spec.get("resample", 2))
    if spec.get("do_resize", True):
        if "height" in spec:
            img = img.resize((int(spec["width"]), int(spec["height"])), resample=resample)
        else:  # shortest edge to N, aspect kept (HF rounds the long side down)
            n, (w, h) = int(spec["shortest_edge"]), img.size
            size = (n, int(n * h / w)) if w <= h else (int(n * w / h), n)
            img = img.resize(size, resample=resample)
    if spec.get("do_center_crop"):
        ch, cw = int(spec["crop_height"]), int(spec["crop_width"])
        w, h = img.size
        left, top = (w - cw) // 2, (h - ch) // 2  # HF: floor of the margin, as PIL's box
        img = img.crop((left, top, left + cw, top + ch))
    x = np.asarray(img, dtype=np.float32)
    if spec.get("do_rescale", True):
        x = x * np.float32(spec.get("rescale_factor", 1 / 255))
    if spec.get("do_normalize", True):
        x = (x - np.asarray(spec["image_mean"], np.float32)) / np.asarray(spec["image_std"], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)


# the spaces a word-level detokenizer leaves before punctuation and English contractions
_SPACE_CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                   (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class OnnxCaptionHead:
    """An image-to-text encoder-decoder (e.g. ViT + GPT-2) run greedily with its past key values.
    Not query-aware: it describes the image the same way whatever the question (ECSO's CAP prompt is)."""

    def __init__(self, head_dir: Union[str, Path], providers: ProviderChoice = "auto",
                 max_new_tokens: Optional[int] = None, threads: Optional[int] = None):
        self.dir = Path(head_dir)
        self.manifest = m = read_manifest(self.dir, "caption")
        c = m["caption"]
        self.name: str = m.get("name") or self.dir.name
        self.image_spec = c["image"]
        self.start_id = int(c["decoder_start_token_id"])
        eos = c.get("eos_token_id")
        self.eos_ids = {int(e) for e in (eos if isinstance(eos, list) else [] if eos is None else [eos])}
        self.clean_up_spaces = bool(c.get("clean_up_tokenization_spaces", False))
        self.max_new_tokens = int(max_new_tokens or c.get("max_new_tokens", 32))
        if self.max_new_tokens < 1:
            raise InputError("max_new_tokens must be at least 1")
        files = m["files"]
        self.encoder, self.provider = open_session(self.dir / files["encoder"], providers, threads)
        self.merged = c["decoder_mode"] == "merged"
        if self.merged:
            self.decoder, _ = open_session(self.dir / files["decoder"], providers, threads)
            self.decoder_with_past = self.decoder
        else:
            self.decoder, _ = open_session(self.dir / files["decoder"], providers, threads)
            self.decoder_with_past, _ = open_session(self.dir / files["decoder_with_past"], providers, threads)
        self.tokenizer = _tokenizer(self.dir / files["tokenizer"])
        self._past_inputs = [i for i in self.decoder_with_past.get_inputs() if i.name.startswith("past_key_values")]

    def _empty_past(self, batch: int) -> dict[str, np.ndarray]:
        """Zero-length past tensors for the merged decoder's first step (sequence axes 0, batch axis `batch`)."""
        feeds = {}
        for i in self._past_inputs:
            shape = [d if isinstance(d, int) else (batch if "batch" in str(d) else 0) for d in i.shape]
            feeds[i.name] = np.zeros(shape, dtype=np.float32)
        return feeds

    def generate_ids(self, pixel_values: np.ndarray, step_logits: Optional[list] = None) -> list[int]:
        """Greedy token ids, starting with decoder_start_token_id and ending with eos when it was reached
        (the sequence transformers' greedy generate returns). `step_logits` collects each step's logits."""
        hidden = self.encoder.run(["last_hidden_state"], {"pixel_values": pixel_values})[0]
        ids = [self.start_id]
        past: Optional[dict[str, np.ndarray]] = None
        for _ in range(self.max_new_tokens):
            feeds = {"input_ids": np.array([[ids[-1]]], dtype=np.int64), "encoder_hidden_states": hidden}
            sess = self.decoder if past is None else self.decoder_with_past
            if self.merged:
                feeds.update(past if past is not None else self._empty_past(1))
                feeds["use_cache_branch"] = np.array([past is not None])
            elif past is not None:
                feeds.update(past)
            outs = sess.run(None, feeds)
            names = [o.name for o in sess.get_outputs()]
            past = {n.replace("present", "past_key_values", 1): v for n, v in zip(names, outs) if n.startswith("present")}
            logits = outs[names.index("logits")][0, -1]
            if step_logits is not None:
                step_logits.append(logits)
            ids.append(int(logits.argmax()))
            if ids[-1] in self.eos_ids:
                break
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the ids without special tokens (and transformers' space clean-up when the model uses it)."""
        text = self.tokenizer.decode(list(ids), skip_special_tokens=True)
        if self.clean_up_spaces:
            for spaced, tight in _SPACE_CLEANUPS:
                text = text.replace(spaced, tight)
        return text.strip()

    def caption(self, image: LoadedImage, query: str = "") -> HeadCaption:
        t0 = time.perf_counter()
        text = self.decode(self.generate_ids(preprocess_image(image, self.image_spec)))
        return HeadCaption(text, self.provider, time.perf_counter() - t0)


class OcrCaptionHead:
    """Reads the text in the image with PP-OCR (the ONNX models shipped by the `rapidocr` package). Typographic
    attacks (MM-SafetyBench TYPO / SD_TYPO, FigStep) put the harmful request exactly there."""

    name = "ocr"

    def __init__(self, providers: ProviderChoice = "auto", min_score: float = 0.5):
        try:
            from rapidocr import RapidOCR
        except ImportError:
            raise HeadError("the OCR head needs the rapidocr package: pip install rapidocr==3.10.0") from None
        wanted, self.strict = requested_providers(providers)
        self.wanted = wanted[0]
        params = {"Global.log_level": "error", "Global.text_score": float(min_score)}
        if self.wanted == PROVIDERS["cuda"]:
            params["EngineConfig.onnxruntime.use_cuda"] = True
        elif self.wanted == PROVIDERS["coreml"]:
            params["EngineConfig.onnxruntime.use_coreml"] = True
        self.min_score = float(min_score)
        self.engine = RapidOCR(params=params)
        self.provider = "unknown"  # known after the first call: rapidocr opens its sessions lazily

    def _actual_provider(self) -> str:
        sess = getattr(getattr(getattr(self.engine, "text_rec", None), "session", None), "session", None)
        got = sess.get_providers()[0] if sess is not None else "unknown"
        if self.strict and got != self.wanted:
            raise HeadError(f"{self.wanted} was requested for OCR but rapidocr runs on {got}; use providers 'auto'")
        return short_provider(got)

    def read_lines(self, image: LoadedImage) -> list[str]:
        """The text lines found, top to bottom, with a recognition score of at least min_score."""
        rgb = np.frombuffer(image.rgb, dtype=np.uint8).reshape(image.height, image.width, 3)
        # rapidocr works in OpenCV's BGR order (as PaddleOCR's models were trained) and takes an array as BGR
        out = self.engine(np.ascontiguousarray(rgb[:, :, ::-1]))
        self.provider = self._actual_provider()
        txts, scores = out.txts or (), out.scores or ()
        return [t.strip() for t, s in zip(txts, scores) if s >= self.min_score and t.strip()]

    def caption(self, image: LoadedImage, query: str = "") -> HeadCaption:
        t0 = time.perf_counter()
        lines = self.read_lines(image)
        text = ("The image contains the text: \"" + " ".join(lines) + "\"") if lines else \
            "No text is visible in the image."
        return HeadCaption(text, self.provider, time.perf_counter() - t0)


class CombinedCaptionHead:
    """Several caption heads joined into one caption (e.g. an image caption plus the text OCR read)."""

    def __init__(self, heads: Sequence):
        if not heads:
            raise InputError("combine needs at least one caption head")
        self.heads = list(heads)
        self.name = "+".join(h.name for h in self.heads)

    def caption(self, image: LoadedImage, query: str = "") -> HeadCaption:
        t0 = time.perf_counter()
        parts = [h.caption(image, query) for h in self.heads]
        text = " ".join(p.text.rstrip(".") + "." for p in parts if p.text.strip())
        provider = "+".join(dict.fromkeys(p.provider for p in parts))
        return HeadCaption(text, provider, time.perf_counter() - t0)


def combine(*heads) -> CombinedCaptionHead:
    """One caption head from several, captions in the order given: combine(caption_head, ocr_head)."""
    return CombinedCaptionHead(heads)


def load_caption_head(spec: Union[str, Path], providers: ProviderChoice = "auto",
                      max_new_tokens: Optional[int] = None, threads: Optional[int] = None):
    """"ocr" -> the OCR head; a folder -> the exported image-to-text head; "DIR+ocr" / "ocr+DIR" -> both, the
    caption first, then the text read from the image."""
    s = str(spec).strip()
    if not s:
        raise InputError("empty caption head spec; use ocr, a head folder, or DIR+ocr")
    parts = [p for p in s.split("+") if p] if not Path(s).exists() else [s]
    if len(parts) > 1:
        heads = [load_caption_head(p, providers, max_new_tokens, threads) for p in parts]
        heads.sort(key=lambda h: isinstance(h, OcrCaptionHead))  # the description first, then the text in it
        return combine(*heads)
    if parts[0] == OCR_SPEC:
        return OcrCaptionHead(providers)
    return OnnxCaptionHead(parts[0], providers, max_new_tokens, threads)
