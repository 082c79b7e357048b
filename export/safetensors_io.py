"""Minimal safetensors reader/writer on numpy (no torch).

Why our own: the exporter must read bf16 checkpoints (numpy has no bfloat16) lazily through a memory map so a
7B checkpoint is never fully loaded, and the tiny test model must be written without torch.
Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then raw data.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_NP_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32,
              "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_DTYPE_NAMES = {np.dtype(v): k for k, v in _NP_DTYPES.items()}


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read (truncated, bad header, unknown dtype)."""


@dataclass(frozen=True)
class TensorRef:
    """A tensor inside a safetensors file, read on demand."""

    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    def load(self) -> np.ndarray:
        """Returns the tensor as a numpy array; BF16 is widened to float32 exactly."""
        if self.dtype == "BF16":
            raw = np.memmap(self.path, dtype=np.uint16, mode="r", offset=self.start,
                            shape=((self.end - self.start) // 2,))
            return (raw.astype(np.uint32) << 16).view(np.float32).reshape(self.shape)
        if self.dtype not in _NP_DTYPES:
            raise SafetensorsError(f"{self.path.name}: unsupported dtype {self.dtype}")
        dt = np.dtype(_NP_DTYPES[self.dtype])
        count = (self.end - self.start) // dt.itemsize
        if count == 0:
            return np.zeros(self.shape, dtype=dt)
        return np.array(np.memmap(self.path, dtype=dt, mode="r", offset=self.start, shape=(count,))).reshape(self.shape)


def read_index(path: Path) -> dict[str, TensorRef]:
    """Lists the tensors of one safetensors file without loading their data."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise SafetensorsError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n <= 0 or 8 + n > size:
            raise SafetensorsError(f"{path}: header length {n} does not fit a file of {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from None
    base = 8 + n
    refs: dict[str, TensorRef] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        if base + end > size:
            raise SafetensorsError(f"{path}: tensor {name} lies past the end of the file (truncated download?)")
        refs[name] = TensorRef(path, info["dtype"], tuple(info["shape"]), base + start, base + end)
    return refs


def write_file(tensors: dict[str, np.ndarray], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Writes tensors deterministically (sorted names, 8-byte aligned header)."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    blobs = []
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        if arr.dtype not in _DTYPE_NAMES:
            raise SafetensorsError(f"cannot write dtype {arr.dtype} for {name}")
        data = arr.tobytes()
        header[name] = {"dtype": _DTYPE_NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for b in blobs:
            f.write(b)
