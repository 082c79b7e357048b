"""Engine: one llama.cpp model (+ mtmd projector) loaded once, driven through the low-level bindings.

Why low level: llama-cpp-python's chat handler clears the KV cache and re-encodes the image on every call, which
makes ECSO's four steps cost four image prefills. Here the engine keeps its native handles (`LlamaContext`) and its
KV sequence 0 (`KvSequence`, with a `PrefixCache` of what it holds), so each prompt evaluates only what differs
from the previous one, and an image is encoded once and then served from the embedding cache.

Prompts are token-exact: a prompt without an image is tokenized whole, one with an image as [head with BOS] /
image / [tail without BOS], LLaVA's `tokenizer_image_token` rule, with the reference's tokenizer rules (vocab.py).

Thread safety: one Engine serves one request at a time. Every public method takes `engine.lock` (an RLock) and
raises EngineError once the engine is closed; callers that chain primitives (the ECSO runner, the server) hold the
lock for the whole request.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from ecso.runtime.devices import OffloadPlan, list_backends_and_devices, offload_plan
from ecso.runtime.errors import ContextOverflowError, EngineError, InputError, ModelError
from ecso.runtime.gguf_info import read_gguf_info
from ecso.runtime.images import (CachedEmbedding, EmbeddingCache, ImageLimits, ImageSource, LoadedImage,
                                 file_fingerprint, load_image)
from ecso.runtime.kv import ImagePiece, Piece, PrefixCache, TextPiece
from ecso.runtime.llama_context import (PROVEN_PROJECTORS, LlamaContext, LoadSettings, Sampler, Sampling,
                                        decode_error)
from ecso.runtime.llama_settings import (gpu_offload_supported, prefer_short_openmp_spin, resolve_cpu_repack,
                                         set_native_logging)
from ecso.runtime.prompts import ChatFormat, Message, RenderedPrompt, chat_format_for
from ecso.runtime.sequence import Generation, KvSequence, PrefillStats, Prompt
from ecso.runtime.vocab import Vocab, wants_space_prefix

__all__ = ["PROVEN_PROJECTORS", "Engine", "EngineConfig", "Generation", "PrefillStats", "Prompt", "Sampler",
           "Sampling"]


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


class DirectDecoder:
    """Sequence 0's decoder: each evaluation is one or more `llama_decode` calls now (the caller holds the engine
    lock). A failed decode empties the whole context (`on_failure`) before its error is raised."""

    def __init__(self, context: LlamaContext, on_failure: Callable[[], None],
                 observe: Callable[[str, object, int], None]):
        self.context, self.on_failure, self.observe = context, on_failure, observe

    def decode_text(self, seq: int, tokens: Sequence[int], pos0: int, check: Callable[[], None],
                    logits_all: bool = False, logits_out: Optional[list] = None) -> None:
        ctx, n = self.context, len(tokens)
        for start in range(0, n, ctx.n_batch):
            check()
            part = tokens[start:start + ctx.n_batch]
            rows = [(tok, pos0 + start + i, seq, bool(logits_all or start + i == n - 1)) for i, tok in enumerate(part)]
            self._check(ctx.decode_rows(rows))
            if logits_all and logits_out is not None:
                logits_out.extend(ctx.row_logits(i) for i in range(len(part)))

    def decode_image(self, seq: int, entry: CachedEmbedding, embd: list[np.ndarray], pos0: int,
                     check: Callable[[], None]) -> None:
        def markers(tokens: Sequence[int], pos: int) -> None:  # the family's marker tokens, as any text
            self.observe("text", tuple(tokens), pos)
            self.decode_text(seq, tokens, pos, check)

        self._check(self.context.decode_image(seq, entry, embd, pos0, markers))

    def _check(self, rc: int) -> None:
        if rc != 0:
            self.on_failure()
            raise decode_error(rc, cleared=True)

    def logits(self, seq: int) -> np.ndarray:
        return self.context.row_logits(-1)

    def sample(self, chain: Sampler, seq: int) -> int:
        return self.context.sample(chain, -1)

    def remove(self, seq: int, from_pos: int) -> bool:
        return self.context.remove(seq, from_pos)

    def clear(self, seq: int) -> None:
        self.context.clear_all()


def engine_offload_plan(n_layer: int, n_gpu_layers: int) -> OffloadPlan:
    """The backend, devices and layer count llama.cpp offloads this model to (recorded in `describe()`)."""
    return offload_plan(n_layer, n_gpu_layers, list_backends_and_devices()[1])


class Engine:
    """A loaded model. Use as a context manager or call close(); see module docstring for thread safety."""

    def __init__(self, config: EngineConfig):
        prefer_short_openmp_spin()  # before llama.cpp (and libgomp) load; a no-op once they have
        self.config = config
        self.lock = threading.RLock()
        self.context: Optional[LlamaContext] = None
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
        space_prefix = wants_space_prefix(self.model_info)  # then llama.cpp's own prefix is off (vocab.py)
        self.gpu_backend = gpu_offload_supported()
        self.n_gpu_layers = (999 if self.gpu_backend else 0) if config.n_gpu_layers < 0 else config.n_gpu_layers
        self.n_threads = config.n_threads or os.cpu_count() or 1
        self.cpu_repack = resolve_cpu_repack(config.cpu_repack)
        settings = LoadSettings(self.n_gpu_layers, self.n_threads, self.cpu_repack.enabled, space_prefix,
                                self.gpu_backend)
        self.context = LlamaContext(config, settings, self.mmproj_info)
        ctx = self.context
        self.vocab: Vocab = ctx.vocab
        self.n_vocab, self.n_embd, self.n_embd_inp = ctx.n_vocab, ctx.n_embd, ctx.n_embd_inp
        self.kv_rollback = ctx.kv_rollback  # False for recurrent / hybrid LLMs: see LlamaContext
        self.n_ctx, self.n_batch = ctx.n_ctx, ctx.n_batch
        self.flash_attn = ctx.flash_attn
        self.offload = engine_offload_plan(ctx.n_layer, self.n_gpu_layers)
        self.model_fingerprint = file_fingerprint(config.model)
        self.mmproj_fingerprint = file_fingerprint(config.mmproj) if config.mmproj else None
        # Optional hook called for every evaluation: ("text", tokens, pos0) or ("image", n_pos, pos0). Tests use it to
        # check the tokens each step actually evaluates; apps can use it for tracing. Must not call the engine.
        self.observer: Optional[Callable[[str, object, int], None]] = None
        self.image_cache = EmbeddingCache(config.image_cache_entries)
        self.sequence = KvSequence(0, DirectDecoder(ctx, self._reset, self._observe), self._read_token, self.n_ctx,
                                   self.lock, self._image_embeddings, self._observe, rolls_back=self.kv_rollback)
        self.kv: PrefixCache = self.sequence.kv  # what sequence 0 holds
        v = self.vocab
        self.chat_format: ChatFormat = chat_format_for(config.chat_format, template, v.token_text(v.bos),
                                                       v.token_text(v.eos), v.adds_bos)

    # ---------------------------------------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Frees the native handles; the engine cannot be used afterwards. Safe to call twice."""
        with self.lock:
            if getattr(self, "image_cache", None) is not None:
                self.image_cache.clear()
            if self.context is not None:
                self.context.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _check_open(self) -> None:
        if self.context is None:
            raise EngineError("the engine is closed; create a new Engine")
        self.context.check_open()

    def _read_token(self, token: int) -> Optional[bytes]:
        """A sampled token's bytes, or None when it ends the generation (end of turn or a control token). Called
        with the lock held and the engine open."""
        return None if self.vocab.ends_generation(token) else self.vocab.token_bytes(token)

    def _observe(self, kind: str, what: object, pos0: int) -> None:
        if self.observer is not None:
            self.observer(kind, what, pos0)

    @property
    @_public
    def has_vision(self) -> bool:
        return self.context.has_vision

    # ---------------------------------------------------------------------------------------------- text
    @_public
    def token_text(self, token: int) -> str:
        return self.vocab.token_text(token)

    @_public
    def tokenize(self, text: str, add_special: bool, parse_special: bool = True) -> list[int]:
        """Token ids of `text` as one tokenizer call, as the reference tokenizes it (vocab.py)."""
        return self.vocab.tokenize(text, add_special, parse_special)

    @_public
    def single_token_ids(self, words: Sequence[str]) -> list[int]:
        """Ids of the words that are one token in this vocabulary."""
        return self.vocab.single_token_ids(words)

    @_public
    def token_bytes(self, token: int) -> bytes:
        return self.vocab.token_bytes(token)

    @_public
    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.vocab.detokenize(tokens)

    @_public
    def clean_user_text(self, text: str) -> str:
        """`text` with control-token spellings broken (`</s>`, `<|im_end|>`): inserted text stays text."""
        return self.vocab.neutralize(text)

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
        cut = self.vocab.stable_head(rendered.head)
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
        return self.sequence.n_past

    def _image_entry(self, image: LoadedImage) -> CachedEmbedding:
        """The cached entry for an image, or a new one holding its preprocessed chunk (not yet encoded)."""
        key = self.image_key(image)
        hit = self.image_cache.get(key)
        if hit is not None:
            return hit
        block = self.context.tokenize_image(image)
        entry = CachedEmbedding(block, None, block.n_cells, block.n_pos)
        self.image_cache.put(key, entry)
        return entry

    def _encode(self, entry: CachedEmbedding) -> list[np.ndarray]:
        """Every image chunk of the block encoded (one array per tile): once per image and request."""
        return self.context.encode(entry.chunk)

    @_public
    def image_embeddings(self, entry: CachedEmbedding, reuse: bool) -> tuple[list[np.ndarray], Optional[float]]:
        """The image's embeddings and the seconds spent encoding them (None: taken from the entry). With reuse an
        image is encoded once and kept on its entry, whichever sequence asks first; without (the naive path),
        every time."""
        return self._image_embeddings(entry, reuse)

    def _image_embeddings(self, entry: CachedEmbedding, reuse: bool) -> tuple[list[np.ndarray], Optional[float]]:
        if reuse and entry.embd is not None:
            return entry.embd, None
        t0 = time.perf_counter()
        embd = self._encode(entry)
        seconds = time.perf_counter() - t0
        if reuse:
            entry.embd = embd
        return embd, seconds

    # ---------------------------------------------------------------------------------------------- sequence 0
    @_public
    @contextlib.contextmanager
    def cancellable(self, should_cancel: Optional[Callable[[], bool]]):
        """While the block runs (holding the lock), `should_cancel()` is checked before each prompt piece (an image
        is one), each decode batch and each generated token; when it returns True the work stops with `Cancelled`.
        This is how a server frees the engine promptly when its client leaves, even mid-prefill or mid-judge."""
        with self.lock, self.sequence.cancellable(should_cancel):
            yield

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
        self._reset()

    def _reset(self) -> None:
        self.sequence.clear()

    @_public
    def rollback(self, n_pos: int) -> None:
        """Drops every KV cell from position n_pos on (never inside an image)."""
        self.sequence.rollback(n_pos)

    @_public
    def prefill(self, prompt: Prompt, reuse: bool = True, logits_all: bool = False,
                logits_out: Optional[list] = None) -> PrefillStats:
        """Makes sequence 0 hold `prompt` (`KvSequence.prefill`)."""
        return self.sequence.prefill(prompt, reuse, logits_all, logits_out)

    @_public
    def logits(self) -> np.ndarray:
        """Logits of the next token after what sequence 0 holds (valid right after prefill/generate)."""
        return self.sequence.logits()

    @_public
    def append_tokens(self, tokens: Sequence[int]) -> None:
        """Evaluates tokens after what the cache holds (used to branch a judge off a running answer)."""
        self.sequence.append_tokens(tokens)

    @_public
    def sampler(self, sampling: Sampling) -> Sampler:
        """A sampler state to share across the `generate` / `sample_next` calls of one step (close it after)."""
        return self.context.sampler(sampling)

    @_public
    def generate(self, sampling: Sampling, on_text: Optional[Callable[[str], None]] = None,
                 should_stop: Optional[Callable[[list[int]], bool]] = None,
                 first_token: Optional[int] = None, sampler: Optional[Sampler] = None) -> Generation:
        """Samples after the current cache contents (`KvSequence.generate`)."""
        return self.sequence.generate(self.context.sampler, sampling, on_text, should_stop, first_token, sampler)

    @_public
    def sample_next(self, sampler: Sampler) -> int:
        """Samples one token from the current logits with the step's sampler, without evaluating it."""
        return self.sequence.sample_next(sampler)

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
            "kv_prefix_reuse": "rollback" if self.kv_rollback else "append-only (recurrent state: recompute)",
            **self.cpu_repack.describe(),
        }
