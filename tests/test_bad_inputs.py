"""Bad inputs across the server, the CLI and the Python API: each gets a clear one-line error with the right status,
exit code or exception type, and the server keeps serving. The same cases produce docs/server.md's figures
(`python bench/soak.py`)."""

from __future__ import annotations

import pytest

from support.reliability import ServerProcess, bad_models, cli_cases, api_cases, server_cases

MAX_IMAGE, MAX_BODY = 1 << 20, 2 << 20


def _failures(outcomes) -> list[str]:
    assert outcomes
    return [f"{o.case}: {o.detail}" for o in outcomes if not o.passed]


@pytest.fixture(scope="module")
def models(tmp_path_factory, demo_files):
    return bad_models(tmp_path_factory.mktemp("bad-models"), demo_files[0])


@pytest.fixture(scope="module")
def server(demo_files):
    args = ["--model", demo_files[0], "--mmproj", demo_files[1], "--ctx", "2048", "--max-tokens", "8",
            "--max-image-mb", "1", "--max-body-mb", "2", "--threads", "1"]
    with ServerProcess(args, api_key="test-key") as s:
        yield s


def test_server_answers_every_bad_input_with_its_status_code_and_keeps_serving(server):
    outcomes = list(server_cases(server, MAX_IMAGE, MAX_BODY))
    assert not _failures(outcomes), _failures(outcomes)
    names = {o.case for o in outcomes}
    for needed in ("decompression bomb -> 400", "huge dimensions -> 400", "truncated image -> 400",
                   "invalid JSON -> 400", "wrong content type -> 415", "body over the size limit -> 413",
                   "query longer than the context -> 400", "wrong API key -> 401",
                   "client disconnects mid-request frees the engine"):
        assert needed in names
    assert server.alive()


def test_python_api_raises_typed_one_line_errors(demo_engine, models, demo_files):
    outcomes = list(api_cases(demo_engine, models, demo_files[0]))
    assert not _failures(outcomes), _failures(outcomes)
    assert len(outcomes) >= 12


def test_cli_exits_with_one_line_errors_and_the_right_codes(models, demo_files, tmp_path):
    outcomes = list(cli_cases(models, tmp_path, demo_files[0]))
    assert not _failures(outcomes), _failures(outcomes)
    assert len(outcomes) >= 14
