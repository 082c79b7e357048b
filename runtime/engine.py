"""Engine: one llama.cpp model (+ mtmd projector) loaded once, driven through the low-level bindings.

Why low level: llama-cpp-python's chat handler clears the KV cache and re-encodes the image on every call, which
makes ECSO's four steps cost four image prefills. Here the engine owns the native handles (model, context, mtmd
context, batch) and a `PrefixCache` describing what sequence 0 holds, so each prompt evaluates only what differs
from the previous one, and an image is encoded once and then served from the embedding cache.

Prompts are token-exact: a prompt without an image is tokenized whole, one with an image as [head with BOS] /
image / [tail without BOS], LLaVA's `tokenizer_image_token` rule, with the reference's tokenizer rules (vocab.py).

Thread safety: one Engine serves one request at a time. Every public method takes `engine.lock` (an RLock) and
raises EngineError once the engine is closed; callers that chain primitives (the ECSO runner, the server) hold the
lock for the whole request.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import functools
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ecso.runtime.devices import OffloadPlan, list_backends_and_devices, offload_plan
from ecso.runtime.errors import Cancelled, ContextOverflowError, EngineError, InputError, ModelError
from ecso.runtime.images import (CachedEmbedding, EmbeddingCache, ImageLimits, ImageSource, LoadedImage,
                                 file_fingerprint, load_image)
from ecso.runtime.kv import ImagePiece, Piece, PrefixCache, TextPiece, n_positions, suffix_after
from ecso.runtime.media import ImageChunk, encode_block, tokenize_image
from ecso.runtime.native import (gpu_offload_supported, prefer_short_openmp_spin, read_gguf_info, resolve_cpu_repack,
                                 set_native_logging)
from ecso.runtime.prompts import ChatFormat, Message, RenderedPrompt, chat_format_for
from ecso.runtime.vocab import Vocab, space_prefix_override, wants_space_prefix


# mmproj projector types (`clip.projector_type`) proven end to end on tiny converted checkpoints
# (tests/test_families.py, tests/test_llava_next.py)
PROVEN_PROJECTORS = ("mlp (LLaVA-1.5, LLaVA-1.6)", "qwen2vl_merger (Qwen2-VL)", "qwen2.5vl_merger (Qwen2.5-VL)",
                     "gemma3 (Gemma 3)", "idefics3 (SmolVLM / Idefics3)")


@dataclass(frozen=True)
class EngineConfig:
    """How to load and run a model. Defaults suit a laptop; GPU offload is on when the build has a GPU backend."""

    model: str
    mmproj: Optional[str] = None
    n_ctx: int = 4096
    n_batch: int = 512
    n_threads: Optional[int] = None  # None: all cores
    n_gpu_layers: int = -1  # -1: every layer when llama.cpp was built with CUDA/Metal/Vulkan, else 0
    mmproj_gpu: bool = True  # run the vision encoder on the GPU too (when there is one)
    # None (default): off on every backend (flash_attn_default). True forces it on: less memory on GPUs, but reuse
    # is then no longer bit-identical to no-reuse (its tiling depends on the KV window, which reuse changes).
    flash_attn: Optional[bool] = None
    kv_f32: bool = False  # f32 KV cache (exactness) instead of f16 (half the memory)
    chat_format: str = "auto"  # auto (the GGUF's template, else llava-1.5) | llava-1.5 | gguf
    # llama.cpp's CPU weight repacking (extra buffer types). auto: off when the build uses AMX, whose repack buffer
    # segfaults (ggml-org/llama.cpp#20824), else on. on / off: forced.
    cpu_repack: str = "auto"
    image_cache_entries: int = 16
    # requests decoded together by `run_many` (runtime/batch.py). 1: the context is exactly the single-request one.
    # N > 1: N more KV sequences (ids 1..N) and N more times n_ctx cells, so every sequence can use n_ctx positions.
    parallel: int = 1
    image_limits: ImageLimits = field(default_factory=ImageLimits)
    max_query_chars: int = 100_000
    verbose: bool = False


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    max_tokens: int = 512


@dataclass
class Prompt:
    """Pieces to evaluate, plus the encoded-image entries they refer to (kept alive with the prompt)."""

    pieces: list[Piece]
    images: dict[str, CachedEmbedding]

    @property
    def n_pos(self) -> int:
        return n_positions(self.pieces)

    @property
    def n_cells(self) -> int:
        """KV cells the prompt fills: more than n_pos when an M-RoPE image packs several tokens per position."""
        return sum(p.n_tokens if isinstance(p, ImagePiece) else p.n_pos for p in self.pieces)


@dataclass
class PrefillStats:
    n_prompt: int  # positions of the prompt
    n_reused: int  # positions already in the KV cache
    n_evaluated: int  # text tokens + image positions evaluated now
    image_encodes: int  # vision-encoder runs
    seconds: float
    encode_seconds: float


@dataclass
class Generation:
    tokens: list[int]
    text: str  # raw decoded text (not stripped)
    finish_reason: str  # "stop" | "length" | "aborted"
    seconds: float


class Sampler:
    """One llama.cpp sampler chain. A step keeps one for all its tokens, so at temperature > 0 its random sequence
    runs on across pauses (guarded streaming) instead of restarting from the seed."""

    def __init__(self, L, s: Sampling):
        self._L = L
        self.ptr = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        if s.temperature <= 0:
            L.llama_sampler_chain_add(self.ptr, L.llama_sampler_init_greedy())
        else:
            if s.top_p < 1.0:
                L.llama_sampler_chain_add(self.ptr, L.llama_sampler_init_top_p(s.top_p, 1))
            L.llama_sampler_chain_add(self.ptr, L.llama_sampler_init_temp(s.temperature))
            L.llama_sampler_chain_add(self.ptr, L.llama_sampler_init_dist(s.seed & 0xFFFFFFFF))

    def close(self) -> None:
        if self.ptr:
            self._L.llama_sampler_free(self.ptr)
            self.ptr = None

    def __enter__(self) -> "Sampler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()


def _public(method):
    """Engine methods callers use: under the lock, and refused once the engine is closed (no freed handle is
    ever touched)."""

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        with self.lock:
            self._check_open()
            return method(self, *args, **kwargs)

    return guarded


def _split_at(tokens: list[int], cut: int) -> list[Piece]:
    return [TextPiece(tuple(t)) for t in (tokens[:cut], tokens[cut:]) if t]


def generate_tokens(engine: "Engine", sampling: Sampling, sample: Callable[[Any], int], feed: Callable[[int], None],
                    n_past: Callable[[], int], on_text: Optional[Callable[[str], None]] = None,
                    should_stop: Optional[Callable[[list[int]], bool]] = None, first_token: Optional[int] = None,
                    sampler: Optional[Sampler] = None) -> Generation:
    """The token loop of `Engine.generate`, shared with batched sequences (runtime/batch.py), which differ only in
    how a token is sampled (`sample(chain)`: from sequence 0's logits, or from a copied row) and fed back
    (`feed(tok)`: a decode on sequence 0, or a job for the batch scheduler). Stops at end of turn, max_tokens, the
    context end, or when `should_stop(tokens)` says so."""
    t0 = time.perf_counter()
    own = Sampler(engine._L, sampling) if sampler is None else None
    chain = (own or sampler).ptr
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out: list[int] = []
    raw = b""
    finish = "length"
    try:
        while len(out) < sampling.max_tokens:
            if first_token is not None:
                tok, first_token = first_token, None
            else:
                tok = sample(chain)
            if engine._vocab.ends_generation(tok):
                finish = "stop"
                break
            if n_past() >= engine.n_ctx:
                break
            piece = engine.token_bytes(tok)
            raw += piece
            out.append(tok)
            feed(tok)
            if on_text is not None:
                delta = utf8.decode(piece)
                if delta:
                    on_text(delta)
            if should_stop is not None and should_stop(out):
                finish = "aborted"
                break
    finally:
        if own is not None:
            own.close()
    return Generation(out, raw.decode("utf-8", errors="replace"), finish, time.perf_counter() - t0)


def flash_attn_default(requested: Optional[bool]) -> bool:
    """Flash attention only when asked for, on every backend (CPU, Vulkan, CUDA, Metal). Its kernels split the
    attention over the KV window, and a step that reuses cached cells sees another window than the same prompt
    evaluated from an empty cache, so the logits differ in the last bits (measured on CPU; on Vulkan see
    docs/gpu.md): ECSO's guarantee that reuse equals recomputation holds only with it off. Never llama.cpp's
    "auto", which turns it on for GPU devices and leaves the recorded setting unknown."""
    return bool(requested)


def engine_offload_plan(n_layer: int, n_gpu_layers: int) -> OffloadPlan:
    """The backend, devices and layer count llama.cpp offloads this model to (recorded in `describe()`)."""
    return offload_plan(n_layer, n_gpu_layers, list_backends_and_devices()[1])


class Engine:
    """A loaded model. Use as a context manager or call close(); see module docstring for thread safety."""

    def __init__(self, config: EngineConfig):
        prefer_short_openmp_spin()  # before llama.cpp (and libgomp) load; a no-op once they have
        import llama_cpp as L
        import llama_cpp.mtmd_cpp as M

        self._L, self._M = L, M
        self.config = config
        self.lock = threading.RLock()
        self._model = self._ctx = self._mctx = None
        self._batch = None
        set_native_logging(config.verbose)
        self.model_info = read_gguf_info(config.model, "model")
        if self.model_info.architecture == "clip":
            raise ModelError(f"{config.model} is an mmproj (vision projector), not a language model; "
                             "pass it as --mmproj and give the LLM as --model")
        self.mmproj_info = read_gguf_info(config.mmproj, "mmproj") if config.mmproj else None
        if self.mmproj_info is not None and self.mmproj_info.architecture != "clip":
            raise ModelError(f"{config.mmproj} is not an mmproj file (architecture "
                             f"{self.mmproj_info.architecture!r}, expected 'clip')")
        if config.n_ctx < 64 or config.n_batch < 1:
            raise InputError("n_ctx must be at least 64 and n_batch at least 1")
        if not 1 <= config.parallel <= 64:
            raise InputError(f"parallel must be between 1 and 64, not {config.parallel}")
        # an unknown --chat-format or a broken template fails here, before any weights are loaded
        template = self.model_info.get("tokenizer.chat_template")
        chat_format_for(config.chat_format, template, "<s>", "</s>", True)
        self._space_prefix = wants_space_prefix(self.model_info)  # then llama.cpp's own prefix is off (vocab.py)
        self.gpu_backend = gpu_offload_supported()
        self.n_gpu_layers = (999 if self.gpu_backend else 0) if config.n_gpu_layers < 0 else config.n_gpu_layers
        self.n_threads = config.n_threads or os.cpu_count() or 1
        self.cpu_repack = resolve_cpu_repack(config.cpu_repack)
        try:
            self._load()
        except BaseException:
            self.close()
            raise
        self.offload = engine_offload_plan(self._L.llama_model_n_layer(self._model), self.n_gpu_layers)
        self.model_fingerprint = file_fingerprint(config.model)
        self.mmproj_fingerprint = file_fingerprint(config.mmproj) if config.mmproj else None
        self.kv = PrefixCache()
        # Optional hook called for every evaluation: ("text", tokens, pos0) or ("image", n_pos, pos0). Tests use it to
        # check the tokens each step actually evaluates; apps can use it for tracing. Must not call the engine.
        self.observer: Optional[Callable[[str, object, int], None]] = None
        self._should_cancel: Optional[Callable[[], bool]] = None  # set only inside `cancellable` (see there)
        self.image_cache = EmbeddingCache(config.image_cache_entries)
        v = self._vocab
        self.chat_format: ChatFormat = chat_format_for(config.chat_format, template, v.token_text(v.bos),
                                                       v.token_text(v.eos), v.adds_bos)

    # ---------------------------------------------------------------------------------------------- lifecycle
    def _load(self) -> None:
        L, M, cfg = self._L, self._M, self.config
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = self.n_gpu_layers
        mp.use_extra_bufts = self.cpu_repack.enabled
        if self._space_prefix:
            overrides = space_prefix_override(L)
            mp.kv_overrides = overrides
        self._model = L.llama_model_load_from_file(str(cfg.model).encode(), mp)
        if not self._model:
            raise ModelError(f"llama.cpp could not load {cfg.model} (corrupt, truncated or unsupported "
                             "architecture); run with -v to see llama.cpp's reason")
        self._vocab = Vocab(L, L.llama_model_get_vocab(self._model), self._space_prefix)
        self.n_vocab = self._vocab.n_vocab
        self.n_embd = L.llama_model_n_embd(self._model)
        if self.mmproj_info is not None:
            proj_dim = self.mmproj_info.get("clip.vision.projection_dim")
            if proj_dim is not None and int(proj_dim) != self.n_embd:
                raise ModelError(f"mmproj {cfg.mmproj} projects to {proj_dim} dims but the model's hidden size is "
                                 f"{self.n_embd}: this projector belongs to another model")
        cp = L.llama_context_default_params()
        slots = cfg.parallel + 1 if cfg.parallel > 1 else 1  # sequence 0 + one per parallel request
        cp.n_ctx = cfg.n_ctx * slots
        cp.n_batch = cp.n_ubatch = min(cfg.n_batch, cfg.n_ctx)
        cp.n_seq_max = cfg.parallel + 1 if cfg.parallel > 1 else 2
        # parallel=1: one unified cache (partial seq_cp/seq_rm, llamacpp-notes P14), today's bit-exact path.
        # parallel>1: one KV stream per sequence. In a unified cache every token attends over the cells of every
        # sequence (masked, but computed): with 4 requests in flight a decode step cost ~2.4x more (issue 14).
        cp.kv_unified = cfg.parallel <= 1
        cp.n_threads = cp.n_threads_batch = self.n_threads
        if cfg.kv_f32:
            cp.type_k = cp.type_v = 0  # GGML_TYPE_F32
        self.flash_attn = flash_attn_default(cfg.flash_attn)
        cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED if self.flash_attn else L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self._ctx = L.llama_init_from_model(self._model, cp)
        if not self._ctx:
            raise ModelError(f"could not create a llama.cpp context of {cfg.n_ctx} tokens (out of memory?); "
                             "try a smaller --ctx")
        self.n_ctx = L.llama_n_ctx(self._ctx) if slots == 1 else cfg.n_ctx  # positions one sequence may use
        self.n_batch = cp.n_batch
        self._mem = L.llama_get_memory(self._ctx)
        self._batch = L.llama_batch_init(self.n_batch, 0, 1)
        if cfg.mmproj:
            p = M.mtmd_context_params_default()
            p.use_gpu = bool(cfg.mmproj_gpu and self.gpu_backend)
            p.n_threads = self.n_threads
            p.warmup = False
            p.print_timings = False
            if not self.flash_attn:
                p.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
            self._mctx = M.mtmd_init_from_file(str(cfg.mmproj).encode(), self._model, p)
            if not self._mctx:
                kind = self.mmproj_info.get("clip.projector_type") if self.mmproj_info is not None else None
                raise ModelError(f"llama.cpp could not load the mmproj {cfg.mmproj} (projector {kind!r}) with this "
                                 "model: corrupt, made for another model, or a family this llama.cpp cannot run; "
                                 f"proven with ecso: {', '.join(PROVEN_PROJECTORS)}; "
                                 "run with -v for llama.cpp's reason")
            if not M.mtmd_support_vision(self._mctx):
                raise ModelError(f"{cfg.mmproj} has no vision encoder")

    def close(self) -> None:
        """Frees the native handles; the engine cannot be used afterwards. Safe to call twice."""
        L, M = self._L, self._M
        with self.lock:
            if getattr(self, "image_cache", None) is not None:
                self.image_cache.clear()
            if self._mctx:
                M.mtmd_free(self._mctx)
                self._mctx = None
            if self._batch is not None:
                L.llama_batch_free(self._batch)
                self._batch = None
            if self._ctx:
                L.llama_free(self._ctx)
                self._ctx = None
            if self._model:
                L.llama_model_free(self._model)
                self._model = None
            self._vocab = None

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    @property
    @_public
    def has_vision(self) -> bool:
        return self._mctx is not None

    def _check_open(self) -> None:
        if not self._ctx or not self._model:
            raise EngineError("the engine is closed; create a new Engine")

    # ---------------------------------------------------------------------------------------------- text
    @_public
    def token_text(self, token: int) -> str:
        return self._vocab.token_text(token)

    @_public
    def tokenize(self, text: str, add_special: bool, parse_special: bool = True) -> list[int]:
        """Token ids of `text` as one tokenizer call, as the reference tokenizes it (vocab.py)."""
        return self._vocab.tokenize(text, add_special, parse_special)

    @_public
    def single_token_ids(self, words: Sequence[str]) -> list[int]:
        """Ids of the words that are one token in this vocabulary."""
        return self._vocab.single_token_ids(words)

    @_public
    def token_bytes(self, token: int) -> bytes:
        return self._vocab.token_bytes(token)

    @_public
    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._vocab.detokenize(tokens)

    @_public
    def clean_user_text(self, text: str) -> str:
        """`text` with control-token spellings broken (`</s>`, `<|im_end|>`): inserted text stays text."""
        return self._vocab.neutralize(text)

    # ---------------------------------------------------------------------------------------------- prompts
    @_public
    def load_image(self, src: ImageSource) -> LoadedImage:
        return load_image(src, self.config.image_limits)

    @_public
    def image_key(self, image: LoadedImage) -> str:
        return f"{image.sha256}:{self.model_fingerprint}:{self.mmproj_fingerprint}"

    @_public
    def build_prompt(self, messages: Sequence[Message], image: Optional[LoadedImage] = None) -> tuple[Prompt, RenderedPrompt]:
        """Renders messages with the chat format (the image, if any, first in the first user turn) and tokenizes
        them as the reference does: whole without an image; [head + BOS] / image / [tail, no BOS] with one.
        Decode boundaries: after the stable part of the head (system prompt and turn header, shared by every step
        with or without the image), and around the image."""
        if image is not None and not self.has_vision:
            raise InputError("this model has no vision projector: pass --mmproj, or send no image")
        rendered = self.chat_format.prompt(messages, image is not None)
        cut = self._vocab.stable_head(rendered.head)
        images: dict[str, CachedEmbedding] = {}
        if image is None:
            return Prompt(_split_at(self.tokenize(rendered.text, add_special=True), cut), images), rendered
        pieces = _split_at(self.tokenize(rendered.head, add_special=True), cut)
        entry = self._image_entry(image)
        key = self.image_key(image)
        images[key] = entry
        pieces.append(ImagePiece(key, entry.n_tokens, entry.n_pos))
        pieces.append(TextPiece(tuple(self.tokenize(rendered.tail, add_special=False))))
        return Prompt(pieces, images), rendered

    @_public
    def has_encoded(self, image: LoadedImage) -> bool:
        """True when the embedding cache already holds this image encoded (the request will not run the encoder)."""
        entry = self.image_cache.peek(self.image_key(image))
        return entry is not None and entry.embd is not None

    @property
    @_public
    def n_past(self) -> int:
        """Positions sequence 0 holds now (prompt and generated tokens)."""
        return self.kv.n_pos

    def _image_entry(self, image: LoadedImage) -> CachedEmbedding:
        """The cached entry for an image, or a new one holding its preprocessed chunk (not yet encoded)."""
        key = self.image_key(image)
        hit = self.image_cache.get(key)
        if hit is not None:
            return hit
        block = tokenize_image(self._M, self._mctx, image)
        entry = CachedEmbedding(block, None, block.n_cells, block.n_pos)
        self.image_cache.put(key, entry)
        return entry

    def _encode(self, entry: CachedEmbedding) -> list[np.ndarray]:
        """Every image chunk of the block encoded (one array per tile): once per image and request."""
        return encode_block(self._M, self._mctx, entry.chunk, self.n_embd)

    def _image_embeddings(self, entry: CachedEmbedding, reuse: bool) -> tuple[list[np.ndarray], Optional[float]]:
        """The image's embeddings and the seconds spent encoding them (None: taken from the entry). With reuse an
        image is encoded once and kept on its entry, whoever asks first; without (the naive path), every time.
        Callers hold the lock (sequence 0's prefill, or a batched sequence's)."""
        if reuse and entry.embd is not None:
            return entry.embd, None
        t0 = time.perf_counter()
        embd = self._encode(entry)
        seconds = time.perf_counter() - t0
        if reuse:
            entry.embd = embd
        return embd, seconds

    # ---------------------------------------------------------------------------------------------- cancellation
    @_public
    @contextlib.contextmanager
    def cancellable(self, should_cancel: Optional[Callable[[], bool]]):
        """While the block runs (holding the lock), `should_cancel()` is checked before each prompt piece (an image
        is one), each decode batch and each generated token; when it returns True the work stops with `Cancelled`.
        This is how a server frees the engine promptly when its client leaves, even mid-prefill or mid-judge."""
        with self.lock:
            outer, self._should_cancel = self._should_cancel, should_cancel
            try:
                yield
            finally:
                self._should_cancel = outer

    def _check_cancel(self) -> None:
        if self._should_cancel is not None and self._should_cancel():
            raise Cancelled("the request was cancelled")

    # ---------------------------------------------------------------------------------------------- KV + decode
    @_public
    def check_budget(self, prompt: Prompt, max_tokens: int, what: str = "prompt") -> None:
        need = prompt.n_cells + max_tokens
        if need > self.n_ctx:
            img = sum(p.n_tokens for p in prompt.pieces if isinstance(p, ImagePiece))
            raise ContextOverflowError(
                f"{what} needs {prompt.n_cells} tokens ({img} for the image) + {max_tokens} new tokens = {need}, "
                f"more than the context of {self.n_ctx}; use a shorter query, fewer --max-tokens or a larger --ctx")

    @_public
    def reset(self) -> None:
        """Empties the KV cache (the embedding cache is kept)."""
        self._L.llama_memory_clear(self._mem, True)
        self.kv.clear()

    @_public
    def rollback(self, n_pos: int) -> None:
        """Drops every KV cell from position n_pos on (never inside an image)."""
        self.kv.truncate(n_pos)
        if not self._L.llama_memory_seq_rm(self._mem, 0, n_pos, -1):
            self.reset()
            raise EngineError("llama.cpp could not roll back the KV cache; it was cleared")

    @_public
    def prefill(self, prompt: Prompt, reuse: bool = True, logits_all: bool = False,
                logits_out: Optional[list] = None) -> PrefillStats:
        """Makes sequence 0 hold `prompt`. With reuse, keeps the longest common prefix already cached and the
        image embeddings from the cache; without, clears everything and encodes the image again (the naive path).
        `logits_all` collects the logits of every text position evaluated into `logits_out` (tests)."""
        with self.lock:
            self._check_open()
            t0 = time.perf_counter()
            if reuse:
                keep = self.kv.reusable_prefix(prompt.pieces)
                self.rollback(keep)
            else:
                self.reset()
                keep = 0
            encodes, t_enc = 0, 0.0
            pos = keep
            for piece in suffix_after(prompt.pieces, keep):
                self._check_cancel()
                if isinstance(piece, TextPiece):
                    self._decode_text(piece.tokens, pos, logits_all, logits_out)
                else:
                    entry = prompt.images[piece.key]
                    embd, seconds = self._image_embeddings(entry, reuse)
                    encodes, t_enc = encodes + (seconds is not None), t_enc + (seconds or 0.0)
                    self._decode_image(entry, embd, pos)
                self.kv.append(piece)
                pos += piece.n_pos
            return PrefillStats(prompt.n_pos, keep, prompt.n_pos - keep, encodes, time.perf_counter() - t0, t_enc)

    def _decode_text(self, tokens: Sequence[int], pos0: int, logits_all: bool = False,
                     logits_out: Optional[list] = None) -> None:
        L, b = self._L, self._batch
        n = len(tokens)
        if self.observer is not None:
            self.observer("text", tuple(tokens), pos0)
        for start in range(0, n, self.n_batch):
            self._check_cancel()
            part = tokens[start:start + self.n_batch]
            b.n_tokens = len(part)
            for i, tok in enumerate(part):
                b.token[i] = tok
                b.pos[i] = pos0 + start + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
                b.logits[i] = bool(logits_all or start + i == n - 1)
            rc = L.llama_decode(self._ctx, b)
            if rc != 0:
                self._fail_decode(rc)
            if logits_all and logits_out is not None:
                for i in range(len(part)):
                    ptr = L.llama_get_logits_ith(self._ctx, i)
                    logits_out.append(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())

    def _decode_image(self, entry: CachedEmbedding, embd: list[np.ndarray], pos: int) -> None:
        """Decodes the image block: its marker tokens as text, each image chunk from its embeddings (mtmd sets the
        positions: M-RoPE grids for Qwen2-VL, non-causal attention for Gemma 3)."""
        L, M = self._L, self._M
        if self.observer is not None:
            self.observer("image", entry.n_pos, pos)
        start = pos
        arrays = iter(embd)
        for part in entry.chunk.parts:
            if not isinstance(part, ImageChunk):
                self._decode_text(part, pos)
                pos += len(part)
                continue
            new_n_past = L.llama_pos(0)
            ptr = next(arrays).ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            rc = M.mtmd_helper_decode_image_chunk(self._mctx, self._ctx, part.ptr, ptr, pos, 0, self.n_batch,
                                                  ctypes.byref(new_n_past), M.mtmd_helper_post_decode_callback(), None)
            if rc != 0:
                self._fail_decode(rc)
            if new_n_past.value != pos + part.n_pos:
                raise EngineError(f"image decode advanced to {new_n_past.value}, expected {pos + part.n_pos}")
            pos += part.n_pos
        if pos != start + entry.n_pos:
            raise EngineError(f"image block took {pos - start} positions, expected {entry.n_pos}")

    def _fail_decode(self, rc: int) -> None:
        self.reset()
        if rc == 1:
            raise ContextOverflowError("the KV cache is full; use a larger --ctx or fewer --max-tokens")
        raise EngineError(f"llama_decode failed with code {rc}; the KV cache was cleared")

    @_public
    def logits(self) -> np.ndarray:
        """Logits of the next token after what sequence 0 holds (valid right after prefill/generate)."""
        ptr = self._L.llama_get_logits_ith(self._ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    @_public
    def append_tokens(self, tokens: Sequence[int]) -> None:
        """Evaluates tokens after what the cache holds (used to branch a judge off a running answer)."""
        if tokens:
            self._decode_text(list(tokens), self.kv.n_pos)
            self.kv.append(TextPiece(tuple(tokens)))

    # ---------------------------------------------------------------------------------------------- sampling
    @_public
    def sampler(self, sampling: Sampling) -> Sampler:
        """A sampler state to share across the `generate` / `sample_next` calls of one step (close it after)."""
        return Sampler(self._L, sampling)

    @_public
    def generate(self, sampling: Sampling, on_text: Optional[Callable[[str], None]] = None,
                 should_stop: Optional[Callable[[list[int]], bool]] = None,
                 first_token: Optional[int] = None, sampler: Optional[Sampler] = None) -> Generation:
        """Samples after the current cache contents until end of turn, max_tokens, the context end, or
        `should_stop(tokens)` returns True. Every accepted token is decoded into the cache.
        `first_token` resumes a generation whose next token was already sampled (guarded streaming); `sampler`
        continues a step's sampler state (else a new one from `sampling` is used for this call)."""
        L = self._L

        def feed(tok: int) -> None:
            self._decode_text([tok], self.kv.n_pos)
            self.kv.append(TextPiece((tok,)))

        with self.lock:
            return generate_tokens(self, sampling, lambda chain: L.llama_sampler_sample(chain, self._ctx, -1), feed,
                                   lambda: self.kv.n_pos, on_text, should_stop, first_token, sampler)

    @_public
    def sample_next(self, sampler: Sampler) -> int:
        """Samples one token from the current logits with the step's sampler, without evaluating it."""
        return self._L.llama_sampler_sample(sampler.ptr, self._ctx, -1)

    # ---------------------------------------------------------------------------------------------- convenience
    @_public
    def chat(self, messages: Sequence[Message], image: Optional[ImageSource] = None,
             sampling: Sampling = Sampling(), reuse: bool = True) -> Generation:
        """Plain generation (no ECSO): render, prefill, generate."""
        loaded = self.load_image(image) if image is not None else None
        prompt, _ = self.build_prompt(messages, loaded)
        self.check_budget(prompt, sampling.max_tokens)
        self.prefill(prompt, reuse=reuse)
        return self.generate(sampling)

    @_public
    def describe(self) -> dict:
        """Facts about the loaded model and backend, recorded in results."""
        return {
            "model": str(Path(self.config.model)), "model_fingerprint": self.model_fingerprint,
            "mmproj": str(Path(self.config.mmproj)) if self.config.mmproj else None,
            "mmproj_fingerprint": self.mmproj_fingerprint, "architecture": self.model_info.architecture,
            "chat_format": self.chat_format.name, "n_ctx": self.n_ctx, "n_embd": self.n_embd,
            "gpu_backend": self.gpu_backend, "n_gpu_layers": self.n_gpu_layers,
            "mmproj_gpu": bool(self.config.mmproj_gpu and self.gpu_backend), "n_threads": self.n_threads,
            "flash_attn": self.flash_attn, "kv_type": "f32" if self.config.kv_f32 else "f16",
            "parallel": self.config.parallel, **self.offload.describe(),
            **self.cpu_repack.describe(),
        }
