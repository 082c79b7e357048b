"""The llama.cpp source that `llama-cpp-python==0.3.36` vendors, unpacked once per machine.

One place for every build that needs llama.cpp's own files beside the installed wheel: the HF converter
(`convert_hf_to_gguf.py`, `conversion/`, `gguf-py/`), the native library (llama.cpp's C++ Jinja engine in
`common/jinja/`, mtmd's image helpers), and `llama-server` (`tools/server`). The wheel installs only the compiled
libraries, so these come from the sdist of exactly that version: pip fetches it once (hash-checked), it is unpacked
atomically (a half-made copy is never used) and reused by every later call, test session and CI run.

`python -m ecso.export.llamacpp_source` prints the source folder (for CMake and shell scripts).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ecso.export.checksums import sha256_file

LLAMA_CPP_PYTHON = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
_VENDOR = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"


class SourceError(RuntimeError):
    """The pinned llama.cpp source could not be fetched or unpacked (the message says what to do)."""


def machine_cache_root() -> Path:
    """Per-machine cache shared by every ECSO_HOME: `$ECSO_CONVERTER_CACHE`, else `$XDG_CACHE_HOME/ecso`, else
    `~/.cache/ecso`. (Tests point ECSO_HOME at a temp folder; the 77 MB sdist should still be fetched only once.)"""
    if os.environ.get("ECSO_CONVERTER_CACHE"):
        return Path(os.environ["ECSO_CONVERTER_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ecso"


@dataclass(frozen=True)
class LlamaCppSource:
    """An unpacked `vendor/llama.cpp` of the pinned sdist."""

    root: Path

    @property
    def jinja_dir(self) -> Path:
        return self.root / "common" / "jinja"

    @property
    def server_dir(self) -> Path:
        return self.root / "tools" / "server"


def _download_sdist(dest: Path) -> Path:
    """pip fetches the sdist from the configured index, hash-checked (--require-hashes)."""
    req = dest / "requirements.txt"
    req.write_text(f"llama-cpp-python=={LLAMA_CPP_PYTHON} --hash=sha256:{SDIST_SHA256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--require-hashes",
           "--disable-pip-version-check", "-q", "-r", str(req), "-d", str(dest)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    sdist = dest / SDIST_NAME
    if r.returncode != 0 or not sdist.exists():
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise SourceError(f"pip could not fetch the llama-cpp-python {LLAMA_CPP_PYTHON} sdist ({last}); "
                          f"check network access to the package index, or put {SDIST_NAME} in "
                          f"{machine_cache_root()} yourself")
    return sdist


def _unpack(sdist: Path, out: Path) -> None:
    """Regular files and folders of `vendor/llama.cpp/` only: no links, nothing outside that folder."""
    with tarfile.open(sdist, "r:gz") as tar:
        found = False
        for m in tar:
            if not m.name.startswith(_VENDOR) or ".." in Path(m.name).parts:
                continue
            target = out / m.name[len(_VENDOR):]
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
            elif m.isfile():
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(m)
                assert src is not None
                target.write_bytes(src.read())
                if m.mode & 0o111:
                    target.chmod(0o755)
                found = found or m.name == _VENDOR + "convert_hf_to_gguf.py"
    if not found:
        raise SourceError(f"{sdist} holds no vendor/llama.cpp/convert_hf_to_gguf.py")


def source_dir(cache: Optional[Path] = None) -> LlamaCppSource:
    """The unpacked source, fetched and unpacked on first use (atomic: a half-made copy is never used)."""
    cache = Path(cache) if cache else machine_cache_root()
    root = cache / f"llama.cpp-src-{LLAMA_CPP_PYTHON}-{SDIST_SHA256[:12]}"
    if (root / ".complete").exists():
        return LlamaCppSource(root)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".llama.cpp-src-", dir=cache) as tmp:
        tmp = Path(tmp)
        sdist = cache / SDIST_NAME
        if not sdist.exists() or sha256_file(sdist) != SDIST_SHA256:
            sdist = _download_sdist(tmp)
        digest = sha256_file(sdist)
        if digest != SDIST_SHA256:
            raise SourceError(f"{sdist} has sha256 {digest}, expected {SDIST_SHA256}; delete it and retry")
        staged = tmp / "src"
        _unpack(sdist, staged)
        (staged / ".complete").write_text(f"{SDIST_NAME} sha256={SDIST_SHA256}\n")
        try:
            os.replace(staged, root)
        except OSError:  # another process finished first: use its copy
            if not (root / ".complete").exists():
                raise
    return LlamaCppSource(root)


def copy_sdist_into_cache(sdist: Path, cache: Optional[Path] = None) -> Path:
    """Seeds the cache with an sdist fetched elsewhere (offline machines); it is hash-checked on use."""
    import shutil

    cache = Path(cache) if cache else machine_cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy2(sdist, cache / SDIST_NAME))


def main() -> int:
    try:
        print(source_dir().root)
    except SourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
