"""Tiny families converted by llama.cpp's own converter, built and converted once per machine.

The builders live in `ecso.models.families` (Qwen2-VL, Qwen2.5-VL, Gemma 3, SmolVLM) and
`ecso.models.families_2025` (Qwen3-VL, Mistral 3, LFM2-VL, GLM-4.1V, ...) and `ecso.models.families_internvl`
(InternVL); this module turns either's checkpoint
into a GGUF + mmproj pair with the pinned converter and caches the pair (and quantized LLMs) per machine.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ecso.export.llamacpp_convert import SDIST_SHA256, convert, converter_dir, machine_cache_root
from ecso.models import families, families_2025, families_internvl


@dataclass(frozen=True)
class ConvertedFamily:
    """A tiny family converted by llama.cpp's own converter: HF folder + the GGUF pair made from it."""

    family: str
    hf: Path
    llm: Path
    mmproj: Path
    architecture: str


def converted_family(family: str, cache: Path | None = None, vocab_cache=None) -> ConvertedFamily:
    """Builds and converts a tiny family once per machine: cached under a key made of the builder module's source
    hash and the converter's sdist sha256, so a change to either rebuilds it (atomic: a half-made folder is never
    used). The families of `ecso.models.families_2025` and InternVL are each cached in their own folder under their
own key."""
    root = Path(cache) if cache else machine_cache_root()
    if family in families.FAMILIES:
        return _converted(family, root / "tiny-families", f"{families.builder_fingerprint()}-{SDIST_SHA256[:12]}",
                          families.build_family, vocab_cache)
    if family == "internvl":  # its own folder and key: a change to it rebuilds no other family
        return _converted(family, root / "tiny-families-internvl",
                          f"{families_internvl.builder_fingerprint()}-{SDIST_SHA256[:12]}",
                          families_internvl.build_family_internvl, vocab_cache)
    if family not in families_2025.FAMILIES_2025:
        raise ValueError(f"unknown tiny family {family!r}; known: "
                         f"{', '.join(families.FAMILIES + families_2025.FAMILIES_2025 + ('internvl',))}")
    return _converted(family, root / "tiny-families-2025", f"{families_2025.builder_fingerprint()}-{SDIST_SHA256[:12]}",
                      families_2025.build_family_2025, vocab_cache)


def _converted(family: str, folder: Path, key: str, build: Callable, vocab_cache) -> ConvertedFamily:
    def make(tmp: Path) -> None:
        conv = converter_dir(folder.parent)
        ck = build(family, tmp / "hf", vocab_cache)
        convert(ck.hf, tmp / "llm.gguf", converter=conv)
        convert(ck.hf, tmp / "mmproj.gguf", mmproj=True, converter=conv)
        (tmp / "architecture").write_text(ck.architecture)

    out = cached_build(folder, key, family, "architecture", make)
    arch = (out / "architecture").read_text()
    return ConvertedFamily(family, out / "hf", out / "llm.gguf", out / "mmproj.gguf", arch)


def cached_build(folder: Path, key: str, name: str, marker: str, make: Callable[[Path], None]) -> Path:
    """`folder/key/name`, made once per machine: `make(tmp)` fills a temporary folder beside it, which is then
    renamed into place (atomic; when another process finished first, its copy is used). `marker`, a path inside,
    exists only in a finished build. Folders of other keys (builds of older builder, converter or exporter code)
    are removed: they are never used again."""
    out = folder / key / name
    if not (out / marker).exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out.parent))
        try:
            make(tmp)
            try:
                os.replace(tmp, out)
            except OSError:  # another process finished first
                if not (out / marker).exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for stale in folder.iterdir():
            if stale.is_dir() and stale.name != key and not stale.name.startswith("."):
                shutil.rmtree(stale, ignore_errors=True)
    return out


def quantized_llm(family: ConvertedFamily, outtype: str = "q8_0") -> Path:
    """The family's LLM converted again at `outtype` (the mmproj stays as converted), beside the f32 one and
    cached with it (atomic: written under a temporary name, then renamed)."""
    out = family.llm.with_name(f"llm-{outtype}.gguf")
    if not out.exists():
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        try:
            convert(family.hf, tmp, outtype=outtype, converter=converter_dir(family.llm.parents[3]))
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    return out
