"""What the KV cache holds, so a new prompt can reuse the longest common prefix.

A prompt is a list of pieces: text tokens or an image (identified by its embedding-cache key, occupying n_pos
positions). The cache of sequence 0 is described the same way, one piece per decode call. Reuse keeps the common
prefix and drops the rest with `llama_memory_seq_rm`; a cut never falls inside an image (its cells are image
embeddings, not text), and a text-only prompt can share only what precedes the image.

Cuts fall only where both the cache and the new prompt have a piece boundary. llama.cpp's numbers depend on how
tokens are batched (a 1-token decode and a 14-token decode round differently), so cutting inside a piece would make
the reused result differ in the last bits from evaluating the prompt from scratch. Cutting at shared boundaries
keeps every batch identical: reuse is bit-exact, whatever earlier requests left in the cache.
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
        """Positions of `prompt` that can be reused: the matching prefix (text token by token, an image only
        whole), cut back to the last position that is a piece boundary of both the cache and the prompt."""
        held = self._units()
        want = _units(prompt)
        n = 0
        pos = 0
        while n < len(held) and n < len(want) and held[n] == want[n]:
            pos += held[n][1] if held[n][0] == "img" else 1
            n += 1
        shared = _boundaries(self.pieces) & _boundaries(prompt)
        return max(b for b in shared if b <= pos)

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

    def _units(self) -> list[tuple]:
        return _units(self.pieces)


def _boundaries(pieces: list[Piece]) -> set[int]:
    out, pos = {0}, 0
    for p in pieces:
        pos += p.n_pos
        out.add(pos)
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
