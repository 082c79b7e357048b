"""What `ecso-run` tells the user: the status line on a terminal, -v / -vv, --quiet, the always-unsafe judge.

Terminal runs use a real pseudo-terminal (pty), as a user's shell gives one, with the real demo model."""

from __future__ import annotations

import errno
import json
import os
import pty
import re
import shlex
import subprocess

from conftest import EXAMPLES, REPO, run_cli

STREET = str(EXAMPLES / "street.png")
STATUS = re.compile(r"^\[ecso\] (safe|UNSAFE: answered again without the image) · judge \S+ replied .+ · steps "
                    r"answer( → \w+)* · reused \d+/\d+ prompt positions · \d+ image encodes? .*· \d+\.\d s$")


def run_in_terminal(args: list[str], timeout: float = 300) -> tuple[int, str]:
    """Runs a command with stdin/stdout/stderr on a pseudo-terminal; returns its exit code and what it showed."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, cwd=REPO, env=dict(os.environ),
                            close_fds=True)
    os.close(slave)
    out = bytearray()
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError as e:  # EIO: the child closed the terminal
            if e.errno != errno.EIO:
                raise
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    code = proc.wait(timeout=timeout)
    return code, out.decode("utf-8", errors="replace").replace("\r\n", "\n")


def readme_commands() -> list[list[str]]:
    """The `ecso-run` command lines of the README's bash blocks, in order (after any `pip install ... &&`)."""
    text = (REPO / "README.md").read_text()
    lines = [ln for block in re.findall(r"```bash\n(.*?)```", text, re.S) for ln in block.splitlines()
             if "ecso-run " in ln]
    return [shlex.split(ln.split("&&", 1)[-1].split("#")[0]) for ln in lines]


def readme_first_command() -> list[str]:
    return readme_commands()[0]


def test_readme_first_command_ends_with_the_status_line_on_a_terminal():
    args = readme_first_command()
    assert args[0] == "ecso-run"
    code, shown = run_in_terminal(args)
    assert code == 0, shown
    lines = [ln for ln in shown.strip().splitlines() if ln.strip()]
    assert len(lines) >= 2, shown  # the answer, then the status line
    assert STATUS.match(lines[-1]), lines[-1]
    assert "1 image encode " in lines[-1] and "llama_model_loader" not in shown


def test_quiet_drops_the_status_line_and_a_pipe_never_gets_it():
    code, shown = run_in_terminal(["ecso-run", "--image", STREET, "--max-tokens", "8", "--quiet", "Describe it."])
    assert code == 0 and shown.strip() and "[ecso]" not in shown, shown
    r = run_cli("ecso-run", "--image", STREET, "--max-tokens", "8", "Describe it.")
    assert r.returncode == 0 and r.stdout.strip() and r.stderr == "", r.stderr


def test_v_traces_steps_without_llama_logs_and_vv_adds_them():
    v = run_cli("ecso-run", "--image", STREET, "--max-tokens", "8", "-v", "Describe it.")
    assert v.returncode == 0, v.stderr
    lines = v.stderr.strip().splitlines()
    assert all(ln.startswith("[ecso]") for ln in lines), v.stderr  # nothing from llama.cpp
    assert lines[0].startswith("[ecso]   answer") and STATUS.match(lines[-1]), v.stderr
    vv = run_cli("ecso-run", "--image", STREET, "--max-tokens", "8", "-vv", "Describe it.")
    assert vv.returncode == 0 and "llama_model_loader" in vv.stderr and "[ecso]   judge" in vv.stderr
    assert vv.stdout == v.stdout


def test_always_unsafe_judge_runs_all_four_steps_and_is_recorded():
    r = run_cli("ecso-run", "--image", STREET, "--max-tokens", "12", "--judge", "always-unsafe", "--json",
                "What is happening in this picture?")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert [s["name"] for s in d["steps"]] == ["answer", "judge", "caption", "regenerate"]
    assert d["unsafe"] is True and d["judge"] == "always-unsafe" and d["options"]["judge"] == "always-unsafe"
    judge_step = d["steps"][1]
    assert judge_step["generated_tokens"] >= 1 and d["judge_reply"] == judge_step["text"]  # the model's real reply
    assert d["caption"] and d["answer"] and d["image_encodes"] == 1


def test_readme_unsafe_path_demo_shows_all_four_steps():
    args = next(c for c in readme_commands() if "always-unsafe" in c)
    code, shown = run_in_terminal(args)
    assert code == 0, shown
    assert "[judged unsafe: answering again without the image]" in shown
    last = shown.strip().splitlines()[-1]
    assert STATUS.match(last) and "steps answer → judge → caption → regenerate" in last, last
    assert "verdict forced" in last and "1 image encode " in last


def test_verbosity_is_shared_llama_logs_only_from_vv(demo_files):
    """Every command builds its engine through engine_config: -v alone never turns on llama.cpp's logs."""
    from ecso.cli.common import engine_config

    base = dict(model="demo", mmproj=None, n_ctx=512, n_gpu_layers=0, no_mmproj_gpu=False, threads=None,
                flash_attn=None, chat_format="auto")
    assert [engine_config(**base, verbose=v).verbose for v in (0, 1, 2, 3)] == [False, False, True, True]
    assert engine_config(**base, verbose=0).model == demo_files[0]
