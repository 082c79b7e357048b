"""Start an `ecso eval` in a child process and SIGKILL it once its answer log holds some records (resume tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def eval_command(data: Path, out: Path, *extra: str) -> list[str]:
    """The eval command line both resume tests use: 4 MM-SafetyBench samples x SD/TYPO, short answers."""
    return [sys.executable, "-c", "from ecso.cli.main import main; main()", "eval", "mmsb", "--data", str(data),
            "--out", str(out), "--mode", "SD", "--mode", "TYPO", "--max-tokens", "16", "--ctx", "2048",
            *extra, "--no-progress", "--no-report"]


def kill_after_records(cmd: list[str], responses: Path, n_records: int, timeout: float) -> None:
    """Runs cmd and kills it with SIGKILL as soon as `responses` has n_records lines; fails if it ended first."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if responses.exists() and responses.read_bytes().count(b"\n") >= n_records:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-500:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
