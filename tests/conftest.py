"""Session fixtures: the tiny LLaVA (built and exported by our own code) and the demo model, built once.

ECSO_HOME points at a session temp folder so tests never write into the user's cache.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

_SESSION_HOME = tempfile.mkdtemp(prefix="ecso-test-home-")
os.environ["ECSO_HOME"] = _SESSION_HOME
atexit.register(shutil.rmtree, _SESSION_HOME, True)
# console scripts (`ecso`, `ecso-run`) started by tests come from the interpreter running them (a virtualenv's own),
# never from another install of ecso that happens to come first on PATH
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
# as the CLI and Engine do (runtime/llama_settings.py): OpenMP threads spin briefly, in every thread that runs llama.cpp
from ecso.runtime.llama_settings import prefer_short_openmp_spin  # noqa: E402

prefer_short_openmp_spin()

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


@dataclass(frozen=True)
class TinyModel:
    hf: Path
    llm: Path
    mmproj: Path
    tower: str


def _build_tiny(root: Path, tower: str) -> TinyModel:
    from ecso.export.llava_gguf import export_llava
    from ecso.models.tiny import TinyShape, build_tiny_llava

    hf = build_tiny_llava(root / "hf", TinyShape(tower=tower))
    r = export_llava(hf, root / "gguf", outtype="f32")
    return TinyModel(hf, r.llm, r.mmproj, tower)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TinyModel:
    """Tiny random LLaVA with a CLIP tower (CLS token, like LLaVA-1.5), exported to f32 GGUF."""
    return _build_tiny(tmp_path_factory.mktemp("tiny-clip"), "clip")


@pytest.fixture(scope="session")
def tiny_siglip(tmp_path_factory) -> TinyModel:
    """Tiny random LLaVA with a SigLIP-style tower (no CLS token): llama.cpp matches transformers end to end."""
    return _build_tiny(tmp_path_factory.mktemp("tiny-siglip"), "siglip")


@pytest.fixture(scope="session")
def demo_files() -> tuple[str, str]:
    """(llm, mmproj) of the demo model: real SmolLM2-135M-Instruct + our generated random projector."""
    from ecso.models.registry import resolve

    e = resolve("demo")
    return e.model, e.mmproj


@pytest.fixture(scope="session")
def demo_engine(demo_files):
    """One demo Engine shared by the session (loading is cheap, but sharing keeps the suite fast)."""
    from ecso.runtime import Engine, EngineConfig

    eng = Engine(EngineConfig(model=demo_files[0], mmproj=demo_files[1], n_ctx=2048))
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def tiny_engine(tiny):
    """Exact-arithmetic tiny engine: f32 KV cache, flash attention off."""
    from ecso.runtime import Engine, EngineConfig

    eng = Engine(EngineConfig(model=str(tiny.llm), mmproj=str(tiny.mmproj), n_ctx=1024, kv_f32=True,
                              flash_attn=False))
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def street_png() -> Path:
    return EXAMPLES / "street.png"


def run_python(code: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs code in a fresh interpreter: anything that could abort the process (llama.cpp asserts) goes here."""
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=e)


def run_cli(*args: str, input: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs an installed console script (`ecso`, `ecso-run`) as a user would."""
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, input=input,
                          env=dict(os.environ))


@pytest.fixture(scope="session")
def libecso() -> Path:
    """libecso built from this checkout with docs/native.md's CMake commands (incremental: cached in build/)."""
    build = REPO / "build"
    env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL=os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "2"))
    for cmd in (["cmake", "-S", str(REPO), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DPython3_EXECUTABLE={sys.executable}"],
                ["cmake", "--build", str(build)]):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if r.returncode != 0:
            pytest.fail(f"building libecso failed ({' '.join(cmd)}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    from ecso.runtime.libecso import library_name

    return build / library_name()


@pytest.fixture
def vls_run(tmp_path) -> Path:
    """A VLSBench run folder with every kind of unknown (tests/support/run_records.py: write_vlsbench_run), shared
    by the report and preset tests."""
    from support.run_records import write_vlsbench_run

    return write_vlsbench_run(tmp_path / "vls")
