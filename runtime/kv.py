"""What the KV cache holds, so a new prompt can reuse the longest common prefix.

A prompt is a list of pieces: text tokens or an image (identified by its embedding-cache key, occupying n_pos
positions). The cache of sequence 0 is described the same way, one piece per decode call. Reuse keeps the common
prefix and drops the rest with `llama_memory_seq_rm`; a cut never falls inside an image (its cells are image
embeddings, not text), and a text-only prompt can share only what precedes the image.

Reuse is decided on token ids: the longest common prefix of the cache and the new prompt (text token by token,
an image only whole), cut back to a decode boundary. llama.cpp's numbers depend on how tokens are batched (a 1-token
decode and a 14-token decode round differently), so the cut must leave the reused positions batched exactly as the
new prompt would batch them from scratch: every decode boundary of both below the cut is the same. Then reuse is
bit-exact, whatever earlier requests left in the cache. Prompts therefore carry their own decode boundaries
(`Engine.build_prompt` places them; `aligned_to` adopts those of what is already cached).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union


@dataclass(frozen=True)
class TextPiece:
    tokens: tuple[int, ...]

    @property
    def n_pos(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class ImagePiece:
    key: str  # content hash + model/mmproj fingerprints
    n_tokens: int
    n_pos: int


Piece = Union[TextPiece, ImagePiece]


def n_positions(pieces: list[Piece]) -> int:
    return sum(p.n_pos for p in pieces)


@dataclass
class PrefixCache:
    """The pieces currently held by one KV sequence, in order."""

    pieces: list[Piece] = field(default_factory=list)

    @property
    def n_pos(self) -> int:
        return n_positions(self.pieces)

    def common_prefix(self, prompt: list[Piece]) -> int:
        """Positions of `prompt` that can be reused: the longest common token prefix, cut back to the last decode
        boundary up to which the cache and the prompt have the very same boundaries (same batches: bit-exact)."""
        limit = common_units(self.pieces, prompt)
        keep = 0
        for a, b in zip(_boundary_list(self.pieces), _boundary_list(prompt)):
            if a != b or a > limit:
                break
            keep = a
        return keep

    def reusable_prefix(self, prompt: list[Piece]) -> int:
        """`common_prefix`, but never the whole prompt: when all of it is cached, its last piece is evaluated again
        for fresh logits."""
        keep, n = self.common_prefix(prompt), n_positions(prompt)
        return n - prompt[-1].n_pos if prompt and keep >= n else keep

    def truncate(self, n_pos: int) -> None:
        """Keeps the first n_pos positions; refuses to cut an image in two."""
        kept: list[Piece] = []
        pos = 0
        for p in self.pieces:
            if pos >= n_pos:
                break
            if pos + p.n_pos <= n_pos:
                kept.append(p)
                pos += p.n_pos
            elif isinstance(p, TextPiece):
                kept.append(TextPiece(p.tokens[: n_pos - pos]))
                pos = n_pos
            else:
                raise ValueError(f"cannot cut the KV cache at {n_pos}: inside an image spanning {pos}..{pos + p.n_pos}")
        self.pieces = kept

    def append(self, piece: Piece) -> None:
        """Records one decode call's worth of positions (kept as its own piece: a reuse boundary)."""
        if piece.n_pos:
            self.pieces.append(piece)

    def clear(self) -> None:
        self.pieces = []


def _boundary_list(pieces: list[Piece]) -> list[int]:
    out, pos = [0], 0
    for p in pieces:
        pos += p.n_pos
        out.append(pos)
    return out


def common_units(a: list[Piece], b: list[Piece]) -> int:
    """Positions of the longest common prefix of two piece lists (text token by token, an image only whole)."""
    ua, ub = _units(a), _units(b)
    n = pos = 0
    while n < len(ua) and n < len(ub) and ua[n] == ub[n]:
        pos += ua[n][1] if ua[n][0] == "img" else 1
        n += 1
    return pos


def aligned_to(prompt: list[Piece], base: list[Piece]) -> list[Piece]:
    """`prompt` with the decode boundaries of `base` added where the two agree: a prompt that extends what is
    cached (an appended judge after the generated answer) is then batched as the cache was, and reuses all of it."""
    limit = common_units(prompt, base)
    cuts = sorted(set(_boundary_list(prompt)) | {b for b in _boundary_list(base) if b <= limit})
    out: list[Piece] = []
    pos = 0
    for p in prompt:
        end = pos + p.n_pos
        inner = [c for c in cuts if pos < c < end]
        if isinstance(p, TextPiece) and inner:
            edges = [pos] + inner + [end]
            out.extend(TextPiece(p.tokens[x - pos:y - pos]) for x, y in zip(edges, edges[1:]))
        else:
            out.append(p)
        pos = end
    return out


def _units(pieces: list[Piece]) -> list[tuple]:
    out: list[tuple] = []
    for p in pieces:
        if isinstance(p, TextPiece):
            out.extend(("tok", t) for t in p.tokens)
        else:
            out.append(("img", p.n_pos, p.key))
    return out


def suffix_after(prompt: list[Piece], n_pos: int) -> list[Piece]:
    """The pieces of `prompt` from position n_pos on (n_pos must not fall inside an image)."""
    out: list[Piece] = []
    pos = 0
    for p in prompt:
        end = pos + p.n_pos
        if end <= n_pos:
            pos = end
            continue
        if pos >= n_pos:
            out.append(p)
        elif isinstance(p, TextPiece):
            out.append(TextPiece(p.tokens[n_pos - pos:]))
        else:
            raise ValueError("suffix would start inside an image")
        pos = end
    return out
