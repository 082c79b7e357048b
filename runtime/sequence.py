"""One KV sequence: what it holds, prefill of text and images, roll back, decode, generate, cancellation.

Sequence 0 (the Engine's own) and the batched sequences 1..N (runtime/batch.py) are the same object. They differ
only in the `Decoder` they are given: sequence 0 decodes directly (`llama_decode` now, under the engine lock), a
batched sequence hands each evaluation to the batch scheduler and waits while the other sequences' evaluations are
packed into the same `llama_decode`. Prefix reuse, image placement, error mapping and the token loop are written once.
"""

from __future__ import annotations

import codecs
import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

import numpy as np

from ecso.runtime.errors import Cancelled, EngineError
from ecso.runtime.images import CachedEmbedding
from ecso.runtime.kv import ImagePiece, Piece, PrefixCache, TextPiece, n_positions, suffix_after
from ecso.runtime.llama_context import Sampler, Sampling


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


class Decoder(Protocol):
    """How a sequence's evaluations reach llama.cpp: directly, or through the batch scheduler."""

    def decode_text(self, seq: int, tokens: Sequence[int], pos0: int, check: Callable[[], None],
                    logits_all: bool = False, logits_out: Optional[list] = None) -> None: ...

    def decode_image(self, seq: int, entry: CachedEmbedding, embd: list[np.ndarray], pos0: int,
                     check: Callable[[], None]) -> None: ...

    def logits(self, seq: int) -> np.ndarray: ...

    def sample(self, chain: Sampler, seq: int) -> int: ...

    def remove(self, seq: int, from_pos: int) -> bool: ...

    def clear(self, seq: int) -> None: ...


Observer = Callable[[str, object, int], None]  # ("text", tokens, pos0) or ("image", n_pos, pos0)
Embeddings = Callable[[CachedEmbedding, bool], tuple[list[np.ndarray], Optional[float]]]
SharePrefix = Callable[["KvSequence", Prompt], int]
ReadToken = Callable[[int], Optional[bytes]]  # a token's bytes, or None when it ends the generation


class KvSequence:
    """KV sequence `seq` and its `PrefixCache`.

    `lock` (the engine's) guards the bookkeeping other sequences read; it is never held while a batched decoder
    waits for the scheduler. `embeddings(entry, reuse)` encodes an image or takes it from the shared cache.
    `read_token(tok)` gives a sampled token's bytes (None: it ends the generation). `observe` is called for every
    evaluation. `share_prefix(sequence, prompt)` may fill an empty sequence's first piece from another sequence
    (batched sequences copy the shared system prompt) and returns its positions. `rolls_back`: False where the
    model's memory cannot be cut back (recurrent / hybrid LLMs): then only a prompt that extends what is held
    reuses it, anything else is recomputed."""

    def __init__(self, seq: int, decoder: Decoder, read_token: ReadToken, n_ctx: int, lock: threading.RLock,
                 embeddings: Embeddings, observe: Observer, share_prefix: Optional[SharePrefix] = None,
                 rolls_back: bool = True):
        self.seq, self.decoder, self.read_token, self.n_ctx, self.lock = seq, decoder, read_token, n_ctx, lock
        self.rolls_back = rolls_back
        self.kv = PrefixCache()
        self.embeddings, self.observe, self.share_prefix = embeddings, observe, share_prefix
        self.should_cancel: Optional[Callable[[], bool]] = None  # set inside `cancellable`

    @property
    def n_past(self) -> int:
        """Positions the sequence holds now (prompt and generated tokens)."""
        return self.kv.n_pos

    # ------------------------------------------------------------------------------------------------ cancellation
    @contextlib.contextmanager
    def cancellable(self, should_cancel: Optional[Callable[[], bool]]):
        """While the block runs, `should_cancel()` is checked before each prompt piece (an image is one), each
        decode batch and each generated token; when it returns True the work stops with `Cancelled`."""
        outer, self.should_cancel = self.should_cancel, should_cancel
        try:
            yield
        finally:
            self.should_cancel = outer

    def check_cancel(self) -> None:
        if self.should_cancel is not None and self.should_cancel():
            raise Cancelled("the request was cancelled")

    # ------------------------------------------------------------------------------------------------ KV
    def clear(self) -> None:
        """Empties the sequence (sequence 0's decoder empties the whole context: it is alone in it)."""
        with self.lock:
            self.decoder.clear(self.seq)
            self.kv.clear()

    def rollback(self, n_pos: int) -> None:
        """Drops every cell from position n_pos on (never inside an image)."""
        with self.lock:
            self.kv.truncate(n_pos)
            if not self.decoder.remove(self.seq, n_pos):
                self.clear()
                raise EngineError("llama.cpp could not roll back the KV cache; it was cleared")

    def prefill(self, prompt: Prompt, reuse: bool = True, logits_all: bool = False,
                logits_out: Optional[list] = None) -> PrefillStats:
        """Makes the sequence hold `prompt`. With reuse, keeps the longest common prefix already held (or the
        shared first piece from another sequence) and the image embeddings from the cache; without, clears the
        sequence and encodes the image again (the naive path). `logits_all` collects the logits of every text
        position evaluated into `logits_out` (tests; sequence 0 only)."""
        t0 = time.perf_counter()
        with self.lock:
            if reuse:
                keep = self.kv.reusable_prefix(prompt.pieces)
                if not self.rolls_back and keep < self.kv.n_pos:
                    keep = 0  # a recurrent state cannot be cut back: recompute
                self.rollback(keep)
                if keep == 0 and self.share_prefix is not None and self.rolls_back:
                    keep = self.share_prefix(self, prompt)
            else:
                self.clear()
                keep = 0
        encodes, t_enc = 0, 0.0
        pos = keep
        for piece in suffix_after(prompt.pieces, keep):
            self.check_cancel()
            if isinstance(piece, TextPiece):
                self.decode_text(piece.tokens, pos, logits_all, logits_out)
            else:
                entry = prompt.images[piece.key]
                embd, seconds = self.embeddings(entry, reuse)
                encodes, t_enc = encodes + (seconds is not None), t_enc + (seconds or 0.0)
                self.observe("image", entry.n_pos, pos)
                self.decoder.decode_image(self.seq, entry, embd, pos, self.check_cancel)
            with self.lock:
                self.kv.append(piece)
            pos += piece.n_pos
        return PrefillStats(prompt.n_pos, keep, prompt.n_pos - keep, encodes, time.perf_counter() - t0, t_enc)

    def decode_text(self, tokens: Sequence[int], pos0: int, logits_all: bool = False,
                    logits_out: Optional[list] = None) -> None:
        self.observe("text", tuple(tokens), pos0)
        self.decoder.decode_text(self.seq, tokens, pos0, self.check_cancel, logits_all, logits_out)

    def append_tokens(self, tokens: Sequence[int]) -> None:
        """Evaluates tokens after what the sequence holds (used to branch a judge off a running answer)."""
        if tokens:
            self.decode_text(tuple(tokens), self.kv.n_pos)
            with self.lock:
                self.kv.append(TextPiece(tuple(tokens)))

    # ------------------------------------------------------------------------------------------------ decode
    def logits(self) -> np.ndarray:
        """Logits of the next token after what the sequence holds (valid right after prefill / generate)."""
        return self.decoder.logits(self.seq)

    def sample_next(self, sampler: Sampler) -> int:
        """Samples one token from the current logits with the step's sampler, without evaluating it."""
        return self.decoder.sample(sampler, self.seq)

    def generate(self, sampler_for: Callable[[Sampling], Sampler], sampling: Sampling,
                 on_text: Optional[Callable[[str], None]] = None,
                 should_stop: Optional[Callable[[list[int]], bool]] = None, first_token: Optional[int] = None,
                 sampler: Optional[Sampler] = None) -> Generation:
        """Samples after what the sequence holds until end of turn, max_tokens, the context end, or
        `should_stop(tokens)` says so; every accepted token is evaluated into the sequence. `first_token` resumes
        a generation whose next token was already sampled (guarded streaming); `sampler` continues a step's
        sampler state (else a new one from `sampling`, made by `sampler_for`, is used for this call)."""
        t0 = time.perf_counter()
        own = sampler_for(sampling) if sampler is None else None
        chain = own or sampler
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        out: list[int] = []
        raw = b""
        finish = "length"
        try:
            while len(out) < sampling.max_tokens:
                if first_token is not None:
                    tok, first_token = first_token, None
                else:
                    tok = self.sample_next(chain)
                piece = self.read_token(tok)
                if piece is None:
                    finish = "stop"
                    break
                if self.kv.n_pos >= self.n_ctx:
                    break
                raw += piece
                out.append(tok)
                self.append_tokens((tok,))
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
