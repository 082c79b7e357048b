"""GGUF header checks: what a model or mmproj file is, read before llama.cpp sees it.

The GGUF header is read here (no `gguf` package on the runtime path) so a wrong file gets a clear message before
llama.cpp sees it, and an mmproj that does not fit the model is refused instead of crashing at decode time.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ecso.runtime.errors import ModelError

GGUF_MAGIC = b"GGUF"
# value types of GGUF metadata
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_WANTED = ("general.architecture", "general.name", "general.file_type", "tokenizer.chat_template",
           "tokenizer.ggml.model", "tokenizer.ggml.add_space_prefix",
           "clip.has_vision_encoder", "clip.projector_type", "clip.vision.projection_dim",
           "clip.vision.image_size", "clip.vision.patch_size", "general.alignment")
_F32, _F16 = 0, 1  # ggml tensor types read_gguf_tensor can return


@dataclass(frozen=True)
class GGUFInfo:
    path: str
    version: int
    n_tensors: int
    meta: dict[str, Any]
    # tensor name -> (dims, ggml type, offset in the data section); filled only when the tensor table was read
    tensors: dict[str, tuple] = field(default_factory=dict)

    @property
    def architecture(self) -> str:
        return str(self.meta.get("general.architecture", "?"))

    def get(self, key: str, default: Any = None) -> Any:
        if key in self.meta:
            return self.meta[key]
        arch = self.architecture
        return self.meta.get(key.replace("{arch}", arch), default)


def read_gguf_info(path: str | os.PathLike, role: str = "model") -> GGUFInfo:
    """Parses the GGUF header and metadata (not the tensors); raises ModelError with a plain reason."""
    return _read_gguf(path, role)[0]


def read_gguf_tensor(path: str | os.PathLike, name: str, role: str = "mmproj") -> Optional[np.ndarray]:
    """The f32 or f16 tensor `name` of a GGUF file as flat f32 values, or None when the file has no such tensor
    (or stores it quantized). Reads only the header, the tensor table and that tensor's bytes."""
    info, f_end = _read_gguf(path, role, tensor_table=True)
    if name not in info.tensors:
        return None
    dims, ggml_type, offset = info.tensors[name]
    if ggml_type not in (_F32, _F16):
        return None
    count = int(np.prod(dims)) if dims else 1
    dtype = np.float32 if ggml_type == _F32 else np.float16
    align = int(info.meta.get("general.alignment", 32) or 32)
    data_start = -(-f_end // align) * align
    with open(path, "rb") as f:
        f.seek(data_start + offset)
        raw = f.read(count * np.dtype(dtype).itemsize)
    if len(raw) != count * np.dtype(dtype).itemsize:
        raise ModelError(f"{path} is truncated (tensor {name} ends past the file); re-download or re-export it")
    return np.frombuffer(raw, dtype=dtype).astype(np.float32)


def _read_gguf(path: str | os.PathLike, role: str, tensor_table: bool = False) -> tuple[GGUFInfo, int]:
    """(info, file offset where the header ends); with tensor_table, info.tensors is filled."""
    p = Path(path)
    if not p.exists():
        raise ModelError(f"{role} file not found: {p}")
    if not p.is_file():
        raise ModelError(f"{role} path is not a file: {p}")
    size = p.stat().st_size
    meta: dict[str, Any] = {}
    table: dict[str, tuple] = {}
    try:
        with open(p, "rb") as f:
            head = f.read(24)
            if len(head) < 24 or head[:4] != GGUF_MAGIC:
                raise ModelError(f"{p} is not a GGUF file (wrong magic bytes); expected a llama.cpp .gguf {role}")
            version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
            if version not in (2, 3) or n_tensors > 1_000_000 or n_kv > 1_000_000:
                raise ModelError(f"{p} has an unsupported or corrupt GGUF header (version {version})")

            def read(n: int) -> bytes:
                b = f.read(n)
                if len(b) != n:
                    raise EOFError
                return b

            def read_str() -> str:
                (n,) = struct.unpack("<Q", read(8))
                if n > size:
                    raise EOFError
                return read(n).decode("utf-8", errors="replace")

            def read_value(t: int) -> Any:
                if t in _SCALARS:
                    fmt = _SCALARS[t]
                    return struct.unpack(fmt, read(struct.calcsize(fmt)))[0]
                if t == _STRING:
                    return read_str()
                if t == _ARRAY:
                    (it, n) = struct.unpack("<IQ", read(12))
                    if it in _SCALARS:
                        read(struct.calcsize(_SCALARS[it]) * n)  # skip: we only keep scalar metadata
                        return None
                    for _ in range(n):
                        read_value(it)
                    return None
                raise ModelError(f"{p}: corrupt GGUF metadata (value type {t})")

            for _ in range(n_kv):
                key = read_str()
                (t,) = struct.unpack("<I", read(4))
                val = read_value(t)
                if key in _WANTED or key.endswith((".embedding_length", ".context_length", ".block_count")):
                    meta[key] = val
            if tensor_table:
                for _ in range(n_tensors):
                    name = read_str()
                    (n_dims,) = struct.unpack("<I", read(4))
                    if n_dims > 8:
                        raise ModelError(f"{p}: corrupt GGUF tensor table ({name}: {n_dims} dimensions)")
                    dims = struct.unpack(f"<{n_dims}Q", read(8 * n_dims))
                    ggml_type, offset = struct.unpack("<IQ", read(12))
                    table[name] = (dims, ggml_type, offset)
            end = f.tell()
    except EOFError:
        raise ModelError(f"{p} is truncated (GGUF metadata ends early); re-download or re-export it") from None
    return GGUFInfo(str(p), version, n_tensors, meta, table), end
