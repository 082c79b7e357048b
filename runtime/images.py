"""Safe image loading and the image-embedding cache.

Images are decoded by Pillow under explicit limits and handed to llama.cpp as raw RGB, so untrusted bytes never
reach stb_image inside llama.cpp. The embedding cache is keyed by a hash of the decoded pixels plus the model and
mmproj fingerprints: the same picture sent twice (or as PNG and as JPEG of identical pixels) is encoded once.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from ecso.runtime.errors import ImageError

ImageSource = Union[str, os.PathLike, bytes, "PIL.Image.Image"]  # noqa: F821

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


@dataclass(frozen=True)
class ImageLimits:
    """Refuse what would exhaust memory before decoding it."""

    max_bytes: int = 50 * 1024 * 1024  # encoded file size
    max_pixels: int = 40_000_000  # width * height after reading the header only
    max_side: int = 16384


@dataclass(frozen=True)
class LoadedImage:
    """Decoded RGB pixels and their content hash.

    `sha256` hashes `"{width}x{height}:"` followed by the RGB bytes after decoding (transparency flattened onto
    white), so the same pixels hash the same whatever file format carried them."""

    rgb: bytes
    width: int
    height: int
    sha256: str
    source: str  # a path, "<bytes>" or "<PIL image>", for messages


def load_image(src: ImageSource, limits: ImageLimits = ImageLimits()) -> LoadedImage:
    """Decodes an image path, bytes or PIL image into RGB under `limits`; raises ImageError with a reason.
    An already loaded image passes through."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(src, LoadedImage):
        return src
    if isinstance(src, Image.Image):
        return _from_pil(src, "<PIL image>", limits)
    if isinstance(src, (bytes, bytearray, memoryview)):
        data, name = bytes(src), "<bytes>"
    else:
        path = Path(src)
        name = str(path)
        if not path.exists():
            raise ImageError(f"image not found: {path}")
        if not path.is_file():
            raise ImageError(f"image path is not a file: {path}")
        size = path.stat().st_size
        if size > limits.max_bytes:
            raise ImageError(f"image {path} is {size / 1e6:.1f} MB, over the {limits.max_bytes / 1e6:.0f} MB limit")
        data = path.read_bytes()
    if not data:
        raise ImageError(f"image {name} is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageError(f"image {name} is {len(data) / 1e6:.1f} MB, over the {limits.max_bytes / 1e6:.0f} MB limit")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.format not in ALLOWED_FORMATS:
                raise ImageError(f"image {name} has format {img.format}; supported: {', '.join(ALLOWED_FORMATS)}")
            _check_size(img.width, img.height, name, limits)
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"image {name} is a decompression bomb (too many pixels); refused") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name} is not an image Pillow can read (supported: {', '.join(ALLOWED_FORMATS)})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"image {name} is corrupt or truncated ({e})") from None
    return _from_pil(img, name, limits)


def _check_size(w: int, h: int, name: str, limits: ImageLimits) -> None:
    if w <= 0 or h <= 0:
        raise ImageError(f"image {name} has no pixels ({w}x{h})")
    if w > limits.max_side or h > limits.max_side or w * h > limits.max_pixels:
        raise ImageError(f"image {name} is {w}x{h}, over the limit of {limits.max_pixels / 1e6:.0f} MP "
                         f"or {limits.max_side} px per side; downscale it first")


def _from_pil(img: "PIL.Image.Image", name: str, limits: ImageLimits) -> LoadedImage:  # noqa: F821
    _check_size(img.width, img.height, name, limits)
    if img.mode != "RGB":
        if img.mode in ("RGBA", "LA", "P", "PA") or "transparency" in img.info:
            # flatten transparency onto white, like most viewers show it
            from PIL import Image

            rgba = img.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(bg, rgba)
        img = img.convert("RGB")
    rgb = img.tobytes()
    h = hashlib.sha256()
    h.update(f"{img.width}x{img.height}:".encode())
    h.update(rgb)
    return LoadedImage(rgb, img.width, img.height, h.hexdigest(), name)


def file_fingerprint(path: str | os.PathLike) -> str:
    """Cheap identity of a model file without reading all of it: the first 16 hex digits of a sha256 over the
    file size (as text), its first MiB and, for files over 2 MiB, its last MiB. The modification time is not
    hashed, so a copied or re-downloaded file keeps its identity (and its cached image embeddings)."""
    p = Path(path)
    st = p.stat()
    h = hashlib.sha256(f"{st.st_size}:".encode())
    with open(p, "rb") as f:
        h.update(f.read(1 << 20))
        if st.st_size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


@dataclass
class CachedEmbedding:
    """An encoded image: what mtmd made of it (kept for decoding), its embeddings and the KV room it takes.

    One image is a block of parts: the family's own text tokens around it (Qwen2-VL's `<|vision_start|>`, Gemma 3's
    `<start_of_image>`, SmolVLM's tile markers) and one or more image chunks (SmolVLM: one per tile). `n_pos` is the
    positions the block advances (M-RoPE images take fewer positions than tokens), `n_tokens` its KV cells."""

    chunk: Any  # engine-owned block: text token tuples and copied mtmd_input_chunk_p wrappers, in order
    embd: Any  # list of numpy float32 arrays, one per image chunk (None until encoded)
    n_tokens: int
    n_pos: int


class EmbeddingCache:
    """A bounded LRU of encoded images. Entries own their native chunk, which is freed with the last reference."""

    def __init__(self, max_entries: int):
        self.max_entries = max(0, max_entries)
        self._items: OrderedDict[str, CachedEmbedding] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> CachedEmbedding | None:
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item

    def peek(self, key: str) -> CachedEmbedding | None:
        """Looks without counting a hit or a miss or touching the LRU order."""
        return self._items.get(key)

    def put(self, key: str, item: CachedEmbedding) -> None:
        self._items.pop(key, None)
        self._items[key] = item
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()
