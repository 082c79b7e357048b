"""The on-disk run: append-only JSONL files that survive SIGKILL, a lock, and atomically replaced JSON files.

RUN_DIR/
  run.json          the configuration: benchmark, selection, generation settings (model fingerprints, prompt
                    version, decision rule, seed, temperature, system prompt...), the preset, the judges used and
                    what each is (`judge_details`: where it runs, its base URL and host, the model asked for)
  samples.jsonl     the current selection (the report's denominator), replaced atomically on every `ecso eval`
  responses.jsonl   one record per (sample id, defense): answer + the full ECSO trace, or why there is none
  judgments.jsonl   one record per (sample id, defense, judge id): kept apart so a run can be re-judged
  leakage.jsonl     one record per (sample id, judge id, view): is the query harmful from its text alone, and (with
                    a judge that sees images) as an image + text pair?

Every record is written with one write() of a full line, flushed and fsync'd. A process killed mid-write leaves
at most a torn last line without its newline; opening the log for writing cuts it off (reading ignores it). The
last record of a key wins, so a retried key never counts twice.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from ecso.runtime.errors import InputError

RUN_FILE = "run.json"
SAMPLES_FILE = "samples.jsonl"
RESPONSES_FILE = "responses.jsonl"
JUDGMENTS_FILE = "judgments.jsonl"
LEAKAGE_FILE = "leakage.jsonl"
LOCK_FILE = ".lock"


@dataclass
class LogContents:
    records: dict[str, dict] = field(default_factory=dict)  # key -> last record
    good_bytes: int = 0  # the file up to the end of its last complete line
    torn_bytes: int = 0  # bytes after it (a line cut by a kill)
    bad_lines: int = 0  # complete lines that are not a JSON record with a "key" (never expected)


def read_log(path: Path) -> LogContents:
    """Reads a JSONL log without changing it: complete lines only, the last record of each key."""
    out = LogContents()
    if not path.exists():
        return out
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        if nl < 0:
            break
        line = data[pos:nl].strip()
        pos = nl + 1
        if not line:
            continue
        try:
            rec = json.loads(line)
            out.records[rec["key"]] = rec
        except (ValueError, KeyError, TypeError):
            out.bad_lines += 1
    out.good_bytes = pos
    out.torn_bytes = len(data) - pos
    return out


class JsonlLog:
    """An append-only log opened for writing: repairs a torn tail, then appends fsync'd lines."""

    def __init__(self, path: Path):
        self.path = path
        contents = read_log(path)
        self.records = contents.records
        self.repaired_bytes = contents.torn_bytes
        self.bad_lines = contents.bad_lines
        if contents.torn_bytes:
            with open(path, "r+b") as f:
                f.truncate(contents.good_bytes)
                f.flush()
                os.fsync(f.fileno())
        self._f = open(path, "ab")

    def append(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        self._f.write(line)
        self._f.flush()
        os.fsync(self._f.fileno())
        self.records[record["key"]] = record

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_jsonl_atomic(path: Path, rows: Iterable[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> Optional[dict]:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise InputError(f"{path} is not valid JSON ({e}); restore it or start a new --out folder") from None


def read_samples(run_dir: Path) -> list[dict]:
    path = run_dir / SAMPLES_FILE
    if not path.exists():
        raise InputError(f"{run_dir} has no {SAMPLES_FILE}: is it a run folder written by `ecso eval`?")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class RunLock:
    """One writer per run folder (an flock, released by the OS even after SIGKILL)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_FILE
        self._f = None

    def __enter__(self) -> "RunLock":
        self._f = open(self.path, "a")
        if sys.platform != "win32":
            import fcntl

            try:
                fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._f.close()
                raise InputError(f"another `ecso eval` is writing to {self.path.parent}; wait for it or use "
                                 "another --out") from None
        return self

    def __exit__(self, *exc) -> None:
        if self._f is not None:
            self._f.close()  # closing releases the flock
