"""llama.cpp's own `llama-server`, built from the pinned llama.cpp source once per machine, and started on loopback.

The binary is built from the same `vendor/llama.cpp` that the converter and the native library use
(`ecso.export.llamacpp_source`), statically linked (`-DBUILD_SHARED_LIBS=OFF`) so that the one file copied into the
machine cache runs on its own. Building is atomic: the binary is copied to a temporary name and renamed, under a file
lock, so concurrent test sessions wait for one build and never run a half-written file.

`python tests/support/llama_server.py` builds (or finds) it and prints its path; CI calls it before the tests.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

BUILD_TIMEOUT_S = 3 * 3600  # a busy 2-core machine took over an hour


def _cache_paths() -> tuple[Path, Path, Path]:
    from ecso.export.llamacpp_source import LLAMA_CPP_PYTHON, SDIST_SHA256, machine_cache_root

    root = machine_cache_root()
    tag = f"{LLAMA_CPP_PYTHON}-{SDIST_SHA256[:12]}"
    return root / f"llama-server-{tag}" / "llama-server", root / f"llama-server-build-{tag}", root / ".llama-server.lock"


def server_binary() -> Path:
    """Path of the built `llama-server`, building it first if this machine has none (about 6 min on 2 cores)."""
    binary, build, lock_path = _cache_paths()
    if binary.exists():
        return binary
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session building it: wait, then reuse its binary
        if binary.exists():
            return binary
        from ecso.export.llamacpp_source import source_dir

        src = source_dir().root
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "2")
        configure = ["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                     "-DLLAMA_BUILD_SERVER=ON", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                     "-DLLAMA_BUILD_EXAMPLES=OFF"]
        compile_ = ["cmake", "--build", str(build), "--target", "llama-server", "-j", jobs]
        for cmd in (configure, compile_):
            r = subprocess.run(["nice", "-n", "10", *cmd], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
            if r.returncode != 0:
                tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-15:])
                raise RuntimeError(f"building llama-server failed ({' '.join(cmd)}):\n{tail}")
        built = build / "bin" / "llama-server"
        binary.parent.mkdir(parents=True, exist_ok=True)
        staged = binary.with_name(".llama-server.partial")
        shutil.copy2(built, staged)
        os.replace(staged, binary)
    return binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LlamaServer:
    """One `llama-server` process on 127.0.0.1 (start / kill / restart on the same port, for fault tests)."""

    model: str
    mmproj: Optional[str]
    slots: int = 1
    n_ctx: int = 4096
    threads: int = 2
    extra: tuple[str, ...] = ()
    port: int = field(default_factory=free_port)
    process: Optional[subprocess.Popen] = None
    log_path: Optional[Path] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        cmd = [str(server_binary()), "-m", self.model, "--host", "127.0.0.1", "--port", str(self.port),
               "-np", str(self.slots), "-c", str(self.n_ctx * self.slots), "-t", str(self.threads),
               "--no-webui", "--jinja"]
        if self.mmproj:
            cmd += ["--mmproj", self.mmproj]
        return cmd + list(self.extra)

    def start(self, timeout: float = 120.0) -> "LlamaServer":
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.process.returncode} while starting "
                                   f"(log: {self.log_path})")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"llama-server did not become healthy in {timeout:.0f} s")

    def kill(self) -> None:
        """SIGKILL, as a crash would: no graceful shutdown, connections in flight are cut."""
        if self.process and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> "LlamaServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    try:
        print(server_binary())
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
