"""The llama.cpp handles of one loaded model: model, context (with its KV memory), mtmd projector and batch.

This module is the only one that touches them. Everything above it (the Engine, the KV sequences, the batch
scheduler, the throughput bench) asks for evaluations through `LlamaContext`'s methods: decode token rows on given
sequences, decode an image block, read a logits row, sample, drop or copy KV cells. Not thread-safe by itself:
callers hold the engine lock around every call.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from ecso.runtime.errors import ContextOverflowError, EngineError, InputError, ModelError
from ecso.runtime.gguf_info import GGUFInfo, read_gguf_tensor
from ecso.runtime.images import CachedEmbedding, LoadedImage
from ecso.runtime.media import ImageChunk, MediaBlock, encode_block, tokenize_image
from ecso.runtime.vocab import Vocab, space_prefix_override

# mmproj projector types (`clip.projector_type`) proven end to end on tiny converted checkpoints
# (tests/test_families.py, tests/test_llava_next.py)
PROVEN_PROJECTORS = ("mlp (LLaVA-1.5, LLaVA-1.6)", "qwen2vl_merger (Qwen2-VL)", "qwen2.5vl_merger (Qwen2.5-VL)",
                     "gemma3 (Gemma 3)", "idefics3 (SmolVLM / Idefics3)")

Row = tuple[int, int, int, bool]  # (token, position, sequence, wants logits): one entry of a llama_batch


def decode_error(rc: int, cleared: bool) -> Exception:
    """The error for a non-zero llama_decode / image-decode return code (1: no KV cell left for the batch)."""
    if rc == 1:
        return ContextOverflowError("the KV cache is full; use a larger --ctx or fewer --max-tokens")
    return EngineError(f"llama_decode failed with code {rc}" + ("; the KV cache was cleared" if cleared else ""))


def flash_attn_default(requested: Optional[bool]) -> bool:
    """Flash attention only when asked for, on every backend (CPU, Vulkan, CUDA, Metal). Its kernels split the
    attention over the KV window (ggml-vulkan by the device's core count and the KV length), and a step that reuses
    cached cells can see another split than the same prompt evaluated from an empty cache, so the logits differ in
    the last bits (measured on CPU): ECSO's guarantee that reuse equals recomputation holds only with it off. Never
    llama.cpp's "auto", which turns it on for GPU devices and leaves the recorded setting unknown."""
    return bool(requested)


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    max_tokens: int = 512


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


@dataclass(frozen=True)
class LoadSettings:
    """What the Engine resolved before loading (GPU layers, threads, CPU repack, the tokenizer's space prefix)."""

    n_gpu_layers: int
    n_threads: int
    use_extra_bufts: bool
    space_prefix: bool
    gpu_backend: bool


class LlamaContext:
    """Loads the model, a context of `n_ctx` cells per sequence for `parallel + 1` sequences, and the projector.

    Raises ModelError with a plain reason when llama.cpp refuses a file; whatever was loaded is then freed."""

    def __init__(self, config, settings: LoadSettings, mmproj_info: Optional[GGUFInfo]):
        import llama_cpp as L
        import llama_cpp.mtmd_cpp as M

        self._L, self._M = L, M
        self._model = self._ctx = self._mctx = self._batch = None
        self.vocab: Optional[Vocab] = None
        try:
            self._load(config, settings, mmproj_info)
        except BaseException:
            self.close()
            raise

    def _load(self, cfg, s: LoadSettings, mmproj_info: Optional[GGUFInfo]) -> None:
        L, M = self._L, self._M
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = s.n_gpu_layers
        mp.use_extra_bufts = s.use_extra_bufts
        if s.space_prefix:
            mp.kv_overrides = self._overrides = space_prefix_override(L)  # kept alive while the model loads
        self._model = L.llama_model_load_from_file(str(cfg.model).encode(), mp)
        if not self._model:
            raise ModelError(f"llama.cpp could not load {cfg.model} (corrupt, truncated or unsupported "
                             "architecture); run with -v to see llama.cpp's reason")
        self.vocab = Vocab(L, L.llama_model_get_vocab(self._model), s.space_prefix)
        self.n_vocab = self.vocab.n_vocab
        self.n_embd = L.llama_model_n_embd(self._model)  # the hidden size
        # Width of one image-embedding row: the hidden size, or more where the LLM takes extra per-token input
        # (Qwen3-VL: n_embd x (1 + deepstack layers)). Every copy of image embeddings uses this width.
        self.n_embd_inp = L.llama_model_n_embd_inp(self._model)
        self.n_layer = L.llama_model_n_layer(self._model)
        # Whether a cached prefix can be cut back (`llama_memory_seq_rm` from a position on). Not for recurrent and
        # hybrid LLMs (LFM2's short convolutions, Mamba, ...): llama.cpp keeps only their latest state, so a prompt
        # that shares a prefix but differs after it is recomputed from the start (image embeddings still come from
        # the cache); a prompt that only extends what is cached (an appended judge) still reuses it.
        self.kv_rollback = not (L.llama_model_is_recurrent(self._model) or L.llama_model_is_hybrid(self._model))
        if mmproj_info is not None:
            proj_dim = mmproj_info.get("clip.vision.projection_dim")
            if proj_dim is not None and int(proj_dim) != self.n_embd:
                raise ModelError(f"mmproj {cfg.mmproj} projects to {proj_dim} dims but the model's hidden size is "
                                 f"{self.n_embd}: this projector belongs to another model")
        cp = L.llama_context_default_params()
        slots = cfg.parallel + 1 if cfg.parallel > 1 else 1  # sequence 0 + one per parallel request
        cp.n_ctx = cfg.n_ctx * slots
        cp.n_batch = cp.n_ubatch = min(cfg.n_batch, cfg.n_ctx)
        cp.n_seq_max = cfg.parallel + 1 if cfg.parallel > 1 else 2
        # parallel=1: one unified cache (partial seq_cp / seq_rm are allowed only there): the bit-exact path.
        # parallel>1: one KV stream per sequence. In a unified cache every token attends over the cells of every
        # sequence (masked, but computed): with 4 requests in flight a decode step cost ~2.4x more.
        cp.kv_unified = cfg.parallel <= 1
        cp.n_threads = cp.n_threads_batch = s.n_threads
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
        self._mmproj = cfg.mmproj
        self._break_row: Optional[np.ndarray] = None  # the [IMG_BREAK] embedding, once read (None: the mmproj has none)
        self._break_row_read = False
        if cfg.mmproj:
            p = M.mtmd_context_params_default()
            p.use_gpu = bool(cfg.mmproj_gpu and s.gpu_backend)
            p.n_threads = s.n_threads
            p.warmup = False
            p.print_timings = False
            if not self.flash_attn:
                p.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
            self._mctx = M.mtmd_init_from_file(str(cfg.mmproj).encode(), self._model, p)
            if not self._mctx:
                kind = mmproj_info.get("clip.projector_type") if mmproj_info is not None else None
                raise ModelError(f"llama.cpp could not load the mmproj {cfg.mmproj} (projector {kind!r}) with this "
                                 "model: corrupt, made for another model, or a family this llama.cpp cannot run; "
                                 f"proven with ecso: {', '.join(PROVEN_PROJECTORS)}; "
                                 "run with -v for llama.cpp's reason")
            if not M.mtmd_support_vision(self._mctx):
                raise ModelError(f"{cfg.mmproj} has no vision encoder")

    # ------------------------------------------------------------------------------------------------ lifecycle
    @property
    def is_open(self) -> bool:
        return bool(self._ctx) and bool(self._model)

    def check_open(self) -> None:
        """Raises EngineError once the handles are freed (no freed handle is ever touched)."""
        if not self.is_open:
            raise EngineError("the engine is closed; create a new Engine")

    @property
    def has_vision(self) -> bool:
        return self._mctx is not None

    def close(self) -> None:
        """Frees every handle; safe to call twice."""
        L, M = self._L, self._M
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
        self.vocab = None

    # ------------------------------------------------------------------------------------------------ images
    def tokenize_image(self, image: LoadedImage) -> MediaBlock:
        """mtmd's preprocessing of the decoded pixels: the family's marker tokens and image chunks, copied."""
        return tokenize_image(self._M, self._mctx, image)

    def encode(self, block: MediaBlock) -> list[np.ndarray]:
        """Every image chunk of the block through the vision encoder (one array per tile, `n_embd_inp` floats per
        image token)."""
        return encode_block(self._M, self._mctx, block, self.n_embd_inp, self.break_row)

    def break_row(self) -> Optional[np.ndarray]:
        """Pixtral / Mistral 3: the mmproj's [IMG_BREAK] embedding (None for other projectors), to restore break rows
        llama.cpp can leave NaN. Read from the file on first need only: a non-finite encoder output."""
        if not self._break_row_read:
            self._break_row = read_gguf_tensor(self._mmproj, "v.token_embd.img_break")
            self._break_row_read = True
        return self._break_row

    def decode_image(self, seq: int, entry: CachedEmbedding, embd: list[np.ndarray], pos: int,
                     on_text: Optional[Callable[[Sequence[int], int], None]] = None) -> int:
        """Decodes an image block on `seq` from position `pos`: the family's marker tokens as text (through
        `on_text(tokens, pos)` when given, else directly), each image chunk from its embeddings (mtmd sets the
        positions: M-RoPE grids for Qwen2-VL, non-causal attention for Gemma 3). Returns 0 or llama.cpp's code."""
        L, M = self._L, self._M
        start = pos
        arrays = iter(embd)
        for part in entry.chunk.parts:
            if not isinstance(part, ImageChunk):
                if on_text is not None:
                    on_text(part, pos)
                else:
                    for first in range(0, len(part), self.n_batch):
                        chunk = part[first:first + self.n_batch]
                        rc = self.decode_rows([(t, pos + first + i, seq, False) for i, t in enumerate(chunk)])
                        if rc != 0:
                            return rc
                pos += len(part)
                continue
            new_n_past = L.llama_pos(0)
            ptr = next(arrays).ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            rc = M.mtmd_helper_decode_image_chunk(self._mctx, self._ctx, part.ptr, ptr, pos, seq, self.n_batch,
                                                  ctypes.byref(new_n_past), M.mtmd_helper_post_decode_callback(), None)
            if rc != 0:
                return rc
            if new_n_past.value != pos + part.n_pos:
                raise EngineError(f"image decode advanced to {new_n_past.value}, expected {pos + part.n_pos}")
            pos += part.n_pos
        if pos != start + entry.n_pos:
            raise EngineError(f"image block took {pos - start} positions, expected {entry.n_pos}")
        return 0

    # ------------------------------------------------------------------------------------------------ text
    def decode_rows(self, rows: Sequence[Row]) -> int:
        """One llama_decode of at most n_batch rows (token, position, sequence, wants logits); llama.cpp's code."""
        if len(rows) > self.n_batch:
            raise InputError(f"{len(rows)} rows do not fit a batch of {self.n_batch}")
        b = self._batch
        for i, (tok, pos, seq, want) in enumerate(rows):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = want
        b.n_tokens = len(rows)
        return self._L.llama_decode(self._ctx, b)

    def row_logits(self, row: int = -1) -> np.ndarray:
        """A copy of the logits of batch row `row` of the last decode (-1: its last row with logits)."""
        ptr = self._L.llama_get_logits_ith(self._ctx, row)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    # ------------------------------------------------------------------------------------------------ sampling
    def sampler(self, sampling: Sampling) -> Sampler:
        return Sampler(self._L, sampling)

    def sample(self, chain: Sampler, row: int = -1) -> int:
        """Samples (and accepts) a token from batch row `row` of the last decode."""
        return self._L.llama_sampler_sample(chain.ptr, self._ctx, row)

    def sample_logits(self, chain: Sampler, logits: np.ndarray) -> int:
        """llama_sampler_sample on a copied logits row: the same candidates, the same chain, accepted afterwards."""
        L, n = self._L, self.n_vocab
        cand = np.empty(n, dtype=[("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
        cand["id"] = np.arange(n, dtype=np.int32)
        cand["logit"] = logits
        cand["p"] = 0.0
        arr = L.llama_token_data_array(cand.ctypes.data_as(ctypes.POINTER(L.llama_token_data)), n, -1, False)
        L.llama_sampler_apply(chain.ptr, ctypes.byref(arr))
        if not 0 <= arr.selected < arr.size:
            raise EngineError("the sampler selected no token")
        tok = int(arr.data[arr.selected].id)
        L.llama_sampler_accept(chain.ptr, tok)
        return tok

    # ------------------------------------------------------------------------------------------------ KV memory
    def clear_all(self) -> None:
        """Empties every sequence's cells."""
        self._L.llama_memory_clear(self._mem, True)

    def remove(self, seq: int, from_pos: int = -1) -> bool:
        """Drops the cells of `seq` from position `from_pos` on (-1: all); False when llama.cpp cannot."""
        return bool(self._L.llama_memory_seq_rm(self._mem, seq, from_pos, -1))

    def copy_sequence(self, src: int, dst: int) -> None:
        """Copies all cells of `src` to `dst`. With one KV stream per sequence llama.cpp copies whole streams only
        (a partial cross-stream copy aborts the process), so callers drop what they do not want afterwards."""
        self._L.llama_memory_seq_cp(self._mem, src, dst, -1, -1)

    def positions(self, seq: int) -> int:
        """Positions llama.cpp holds for `seq` (0: empty)."""
        return self._L.llama_memory_seq_pos_max(self._mem, seq) + 1
