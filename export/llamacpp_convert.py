"""llama.cpp's own `convert_hf_to_gguf.py`, of exactly the llama.cpp that llama-cpp-python==0.3.36 vendors.

Why this exists: for the VLM families llama.cpp supports (Qwen2-VL, Qwen2.5-VL, Gemma 3, SmolVLM/Idefics3, ...)
its converter is the reference way to make GGUF + mmproj pairs; ecso does not write its own. The converter is not
on PyPI by itself, but the sdist of the pinned llama-cpp-python holds it (`vendor/llama.cpp/convert_hf_to_gguf.py`,
`conversion/`, `gguf-py/`). `converter_dir()` fetches that sdist with pip once per machine, checks its sha256,
unpacks only those files and reuses them afterwards. `convert()` runs it in a subprocess with the vendored gguf-py
first on PYTHONPATH, so the converter and the runtime speak the same GGUF dialect.

The converter needs torch and transformers (`pip install 'ecso[export]'`); the runtime never imports this module.
"""

from __future__ import annotations

import os
import shutil
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
_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")


class ConverterError(RuntimeError):
    """The converter could not be fetched, or it refused a checkpoint (message: its own last error line)."""


def machine_cache_root() -> Path:
    """Per-machine cache shared by every ECSO_HOME: `$ECSO_CONVERTER_CACHE`, else `$XDG_CACHE_HOME/ecso`, else
    `~/.cache/ecso`. (Tests point ECSO_HOME at a temp folder; the 77 MB sdist should still be fetched only once.)"""
    if os.environ.get("ECSO_CONVERTER_CACHE"):
        return Path(os.environ["ECSO_CONVERTER_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ecso"


@dataclass(frozen=True)
class Converter:
    """An unpacked converter: the script and the gguf-py it must run with."""

    root: Path

    @property
    def script(self) -> Path:
        return self.root / "convert_hf_to_gguf.py"

    @property
    def gguf_py(self) -> Path:
        return self.root / "gguf-py"

    def command(self, hf_dir: Path, outfile: Path, outtype: str = "f32", mmproj: bool = False) -> list[str]:
        """The command line a user would type (with PYTHONPATH set to `gguf_py`)."""
        cmd = [sys.executable, str(self.script), str(hf_dir), "--outfile", str(outfile), "--outtype", outtype]
        return cmd + (["--mmproj"] if mmproj else [])


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
        raise ConverterError(f"pip could not fetch the llama-cpp-python {LLAMA_CPP_PYTHON} sdist ({last}); "
                             f"check network access to the package index, or put {SDIST_NAME} in "
                             f"{machine_cache_root()} yourself")
    return sdist


def _unpack(sdist: Path, out: Path) -> None:
    with tarfile.open(sdist, "r:gz") as tar:
        members = [m for m in tar.getmembers()
                   if m.name.startswith(_VENDOR) and m.name[len(_VENDOR):].startswith(_MEMBERS)
                   and (m.isfile() or m.isdir())]
        if not any(m.name == _VENDOR + "convert_hf_to_gguf.py" for m in members):
            raise ConverterError(f"{sdist} holds no vendor/llama.cpp/convert_hf_to_gguf.py")
        for m in members:
            target = out / m.name[len(_VENDOR):]
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(m)
            assert src is not None
            target.write_bytes(src.read())


def converter_dir(cache: Optional[Path] = None) -> Converter:
    """The unpacked converter, fetched and unpacked on first use (atomic: a half-made copy is never used)."""
    cache = Path(cache) if cache else machine_cache_root()
    root = cache / f"llama.cpp-converter-{LLAMA_CPP_PYTHON}-{SDIST_SHA256[:12]}"
    if (root / ".complete").exists():
        return Converter(root)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".converter-", dir=cache) as tmp:
        tmp = Path(tmp)
        sdist = cache / SDIST_NAME
        if not sdist.exists() or sha256_file(sdist) != SDIST_SHA256:
            sdist = _download_sdist(tmp)
        digest = sha256_file(sdist)
        if digest != SDIST_SHA256:
            raise ConverterError(f"{sdist} has sha256 {digest}, expected {SDIST_SHA256}; delete it and retry")
        staged = tmp / "converter"
        _unpack(sdist, staged)
        (staged / ".complete").write_text(f"{SDIST_NAME} sha256={SDIST_SHA256}\n")
        try:
            os.replace(staged, root)
        except OSError:  # another process finished first: use its copy
            if not (root / ".complete").exists():
                raise
    return Converter(root)


def convert(hf_dir: Path, outfile: Path, outtype: str = "f32", mmproj: bool = False,
            converter: Optional[Converter] = None, timeout: float = 600) -> Path:
    """Runs the converter on an HF folder; returns the GGUF path. Raises ConverterError with its last error line."""
    conv = converter or converter_dir()
    outfile = Path(outfile)
    outfile.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(conv.gguf_py)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("NO_LOCAL_GGUF", None)  # the converter then puts its own gguf-py first too
    r = subprocess.run(conv.command(Path(hf_dir), outfile, outtype, mmproj), capture_output=True, text=True,
                       env=env, timeout=timeout)
    if r.returncode != 0 or not outfile.exists():
        lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
        errors = [ln for ln in lines if "Error" in ln or "error" in ln] or lines or ["no output"]
        raise ConverterError(f"convert_hf_to_gguf.py{' --mmproj' if mmproj else ''} failed on {hf_dir}: "
                             f"{errors[-1].strip()}")
    return outfile


def copy_sdist_into_cache(sdist: Path, cache: Optional[Path] = None) -> Path:
    """Seeds the cache with an sdist fetched elsewhere (offline machines); it is hash-checked on use."""
    cache = Path(cache) if cache else machine_cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy2(sdist, cache / SDIST_NAME))
