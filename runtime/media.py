"""What mtmd makes of one image, owned on the Python side.

Why a block and not one chunk: most families wrap the image in their own tokens and some split it. mtmd's tokenizer
turns the media marker into text chunks (Qwen2-VL `<|vision_start|>`, Gemma 3 `<start_of_image>`, SmolVLM's
`<fake_token_around_image><row_1_col_1>`...) and one image chunk per tile. The engine keeps all of it, in order, as
one KV piece: the markers are decoded as text, every tile is encoded once per request and decoded from its cached
embeddings. Positions come from mtmd (`mtmd_input_chunk_get_n_pos`): an M-RoPE image occupies fewer positions than
it has tokens, so a block reports both its positions and its KV cells.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np

from ecso.runtime.errors import EngineError, InputError
from ecso.runtime.images import LoadedImage


class ImageChunk:
    """Owns one copied mtmd image chunk (one tile); freed when the last reference goes."""

    def __init__(self, ptr, mtmd, n_tokens: int, n_pos: int):
        self.ptr = ptr
        self._mtmd = mtmd
        self.n_tokens, self.n_pos = n_tokens, n_pos

    def __del__(self):
        if self.ptr:
            self._mtmd.mtmd_input_chunk_free(self.ptr)
            self.ptr = None


Part = Union[tuple, ImageChunk]  # text token ids, or an image chunk


@dataclass
class MediaBlock:
    """Everything mtmd made of one image, in order: the family's marker tokens and its image chunks."""

    parts: list[Part]

    @property
    def images(self) -> list[ImageChunk]:
        return [p for p in self.parts if isinstance(p, ImageChunk)]

    @property
    def n_pos(self) -> int:
        return sum(p.n_pos if isinstance(p, ImageChunk) else len(p) for p in self.parts)

    @property
    def n_cells(self) -> int:
        return sum(p.n_tokens if isinstance(p, ImageChunk) else len(p) for p in self.parts)


def tokenize_image(M, mctx, image: LoadedImage) -> MediaBlock:
    """Runs mtmd's preprocessing on the decoded RGB pixels (the marker alone as text) and copies what it made."""
    rgb = (ctypes.c_uint8 * len(image.rgb)).from_buffer_copy(image.rgb)
    bitmap = M.mtmd_bitmap_init(image.width, image.height, rgb)
    if not bitmap:
        raise InputError(f"llama.cpp refused image {image.source} ({image.width}x{image.height})")
    chunks = M.mtmd_input_chunks_init()
    try:
        text = M.mtmd_input_text()
        marker = M.mtmd_default_marker()
        text.text, text.text_len, text.add_special, text.parse_special = marker, len(marker), False, True
        bitmaps = (M.mtmd_bitmap_p_ctypes * 1)(bitmap)
        rc = M.mtmd_tokenize(mctx, chunks, ctypes.byref(text), bitmaps, 1)
        if rc != 0:
            raise InputError(f"llama.cpp could not preprocess image {image.source} (mtmd_tokenize={rc})")
        parts: list[Part] = []
        for i in range(M.mtmd_input_chunks_size(chunks)):
            c = M.mtmd_input_chunks_get(chunks, i)
            kind = M.mtmd_input_chunk_get_type(c)
            if kind == M.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                toks = M.mtmd_input_chunk_get_tokens_text(c, ctypes.byref(n))
                if n.value:
                    parts.append(tuple(toks[j] for j in range(n.value)))
            elif kind == M.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                parts.append(ImageChunk(M.mtmd_input_chunk_copy(c), M, M.mtmd_input_chunk_get_n_tokens(c),
                                        M.mtmd_input_chunk_get_n_pos(c)))
            else:
                raise InputError(f"llama.cpp turned image {image.source} into a non-image chunk; this mmproj "
                                 "is not a vision projector ecso supports")
    finally:
        M.mtmd_input_chunks_free(chunks)
        M.mtmd_bitmap_free(bitmap)
    block = MediaBlock(parts)
    if not block.images:
        raise InputError(f"llama.cpp produced no image tokens for {image.source}")
    return block


def encode_block(M, mctx, block: MediaBlock, n_embd_inp: int,
                 break_row: Optional[Callable[[], Optional[np.ndarray]]] = None) -> list[np.ndarray]:
    """Runs the vision encoder on every image chunk of the block (SmolVLM: each tile); one array per chunk.

    Each image token is a row of `n_embd_inp` floats (`llama_model_n_embd_inp`), which is what mtmd writes and what
    `mtmd_helper_decode_image_chunk` reads back. It equals the hidden size for most families, but Qwen3-VL's rows
    also carry its deepstack features: n_embd x (1 + deepstack layers). Copying only n_embd per token would hand
    llama.cpp a buffer it reads past the end of.

    `break_row`: returns the mmproj's [IMG_BREAK] embedding (Pixtral / Mistral 3) or None; called only when the
    output holds a non-finite value, for `repair_break_rows`. Any other non-finite value is refused: it would
    decode into a silently wrong answer."""
    out = []
    for img in block.images:
        rc = M.mtmd_encode_chunk(mctx, img.ptr)
        if rc != 0:
            raise EngineError(f"the vision encoder failed (mtmd_encode_chunk={rc})")
        ptr = M.mtmd_get_output_embd(mctx)
        rows = np.ctypeslib.as_array(ptr, shape=(img.n_tokens * n_embd_inp,)).copy()
        if not np.isfinite(rows).all():
            brk = break_row() if break_row is not None else None
            if brk is not None:
                repair_break_rows(rows.reshape(img.n_tokens, n_embd_inp), brk)
            if not np.isfinite(rows).all():
                raise EngineError("the vision encoder returned non-finite image embeddings (NaN or inf); the mmproj "
                                  "file is broken or does not fit this model; re-export it or use the model's own")
        out.append(rows)
    return out


def repair_break_rows(rows: np.ndarray, break_row: np.ndarray) -> None:
    """Restores Pixtral's [IMG_BREAK] rows in place where llama.cpp left them NaN.

    The pinned llama.cpp's Pixtral graph makes each break row as `0 * t + img_break`, with `t` a fresh, never
    written tensor: "clearing" by scaling leaves NaN wherever that memory held NaN or inf bits from an earlier
    graph (seen here with a Mistral 3 encoder run after a Qwen3-VL one in the same process). A correct break row is
    exactly `img_break`. Break rows end each row of patches but the last, so the n tokens are p_y rows of
    (p_x + 1) minus one: the rows that are exactly `img_break` or non-finite must be the (k * (p_x + 1) - 1)-th.
    Only then are the non-finite ones replaced; anything else is left for the caller to refuse."""
    n = rows.shape[0]
    if rows.shape[1] != break_row.shape[0]:
        return
    bad = ~np.isfinite(rows).all(axis=1)
    idx = np.flatnonzero(bad | (rows == break_row).all(axis=1))
    if not len(idx):
        return
    period = int(idx[0]) + 1
    expected = np.arange(period - 1, n, period)
    if period < 2 or (n + 1) % period or not np.array_equal(idx, expected):
        return
    rows[bad] = break_row
