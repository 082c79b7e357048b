"""llama.cpp's own `convert_hf_to_gguf.py`, of exactly the llama.cpp that llama-cpp-python==0.3.36 vendors.

Why this exists: for the VLM families llama.cpp supports (Qwen2-VL, Qwen2.5-VL, Gemma 3, SmolVLM/Idefics3, ...)
its converter is the reference way to make GGUF + mmproj pairs; ecso does not write its own. The converter is not
on PyPI by itself, but the sdist of the pinned llama-cpp-python holds it (`vendor/llama.cpp/convert_hf_to_gguf.py`,
`conversion/`, `gguf-py/`). `converter_dir()` uses the source tree that `llamacpp_source` unpacks once per machine
(the same tree the native library and llama-server builds use). `convert()` runs it in a subprocess with the
vendored gguf-py first on PYTHONPATH, so the converter and the runtime speak the same GGUF dialect.

The converter needs torch and transformers (`pip install 'ecso[export]'`); the runtime never imports this module.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# re-exported: callers of the converter name the pin and the cache through this module
from ecso.export.llamacpp_source import (LLAMA_CPP_PYTHON, SDIST_NAME, SDIST_SHA256, SourceError,  # noqa: F401
                                         copy_sdist_into_cache, machine_cache_root, source_dir)


# The converter runs through this shim, which mends one bug of the pinned converter: for an HF-layout Mistral 3 /
# Pixtral checkpoint (`Mistral3ForConditionalGeneration`), `MmprojModel.filter_tensors` drops every tensor named
# `...language_model...` before `LlavaVisionModel.modify_tensors` can copy the [IMG_BREAK] row out of the LLM's token
# embeddings, so the mmproj lacks `v.token_embd.img_break` and mtmd refuses to load it ("unable to find tensor
# v.token_embd.img_break"). The shim lets the token-embedding tensor through to that method (which keeps only the
# [IMG_BREAK] row and drops the rest); every other family converts exactly as with the plain script.
_SHIM = """
import runpy, sys
root, script = sys.argv[1], sys.argv[2]
sys.path.insert(0, root)
from conversion import llava
_filter = llava.LlavaVisionModel.filter_tensors.__func__
def filter_tensors(cls, item):
    name = item[0]
    if "language_model." in name and name.endswith("embed_tokens.weight") and getattr(cls, "use_break_tok", False):
        return item
    return _filter(cls, item)
llava.LlavaVisionModel.filter_tensors = classmethod(filter_tensors)
sys.argv = sys.argv[2:]
runpy.run_path(script, run_name="__main__")
"""


class ConverterError(SourceError):
    """The converter could not be fetched, or it refused a checkpoint (message: its own last error line)."""


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


def converter_dir(cache: Optional[Path] = None) -> Converter:
    """The converter inside the pinned llama.cpp source, unpacked once per machine (`llamacpp_source`)."""
    try:
        return Converter(source_dir(cache).root)
    except SourceError as e:
        raise ConverterError(str(e)) from None


def convert(hf_dir: Path, outfile: Path, outtype: str = "f32", mmproj: bool = False,
            converter: Optional[Converter] = None, timeout: float = 600) -> Path:
    """Runs the converter on an HF folder; returns the GGUF path. Raises ConverterError with its last error line."""
    conv = converter or converter_dir()
    outfile = Path(outfile)
    outfile.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(conv.gguf_py)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("NO_LOCAL_GGUF", None)  # the converter then puts its own gguf-py first too
    cmd = conv.command(Path(hf_dir), outfile, outtype, mmproj)
    cmd = [cmd[0], "-c", _SHIM, str(conv.root)] + cmd[1:]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if r.returncode != 0 or not outfile.exists():
        lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
        errors = [ln for ln in lines if "Error" in ln or "error" in ln] or lines or ["no output"]
        raise ConverterError(f"convert_hf_to_gguf.py{' --mmproj' if mmproj else ''} failed on {hf_dir}: "
                             f"{errors[-1].strip()}")
    return outfile
