"""`ecso.load`: one call by registry name, GGUF path or export folder; the top-level `ecso` package installed both
editable and as a plain `pip install .`, imported from inside and outside the source tree."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys

import pytest

import ecso
from conftest import EXAMPLES, REPO, run_cli
from ecso.runtime import InputError, ModelError

STREET = str(EXAMPLES / "street.png")


def test_load_demo_by_name_runs_ecso():
    with ecso.load("demo", max_tokens=8, caption_max_tokens=8, n_ctx=2048) as model:
        r = model.run(STREET, "What is happening in this picture?")
        assert r.steps[0].generated_tokens > 0 and r.initial_answer == r.steps[0].text
        assert r.judge == "paper" and r.image_encodes == 1
        assert model.engine.config.n_ctx == 2048 and model.options.max_tokens == 8
        forced = model.run(STREET, "What is happening in this picture?", judge="always-unsafe")
        assert forced.unsafe and [s.name for s in forced.steps] == ["answer", "judge", "caption", "regenerate"]


def test_load_export_folder_takes_the_pair_and_the_chat_format_from_it(tiny):
    folder = tiny.llm.parent
    assert sorted(p.name for p in folder.iterdir()) == ["ecso.json", "llm.gguf", "mmproj.gguf"]
    with ecso.load(folder, max_tokens=4, n_ctx=1024) as model:
        assert model.engine.config.model == str(tiny.llm) and model.engine.config.mmproj == str(tiny.mmproj)
        assert model.engine.config.chat_format == "llava-1.5"  # from ecso.json
        r = model.run(STREET, "What is this?")
        assert r.image_encodes == 1 and [s.name for s in r.steps][:2] == ["answer", "judge"]


def test_cli_model_option_takes_an_export_folder_too(tiny):
    r = run_cli("ecso-run", "--model", str(tiny.llm.parent), "--image", STREET, "--max-tokens", "4", "--json", "Hi?")
    assert r.returncode == 0, r.stderr
    engine = json.loads(r.stdout)["engine"]
    assert engine["model"] == str(tiny.llm) and engine["mmproj"] == str(tiny.mmproj)


def test_load_gguf_path_with_mmproj(demo_files):
    with ecso.load(demo_files[0], mmproj=demo_files[1], max_tokens=4, n_ctx=2048, defense=False) as model:
        r = model.run(STREET, "Describe it.")
        assert r.judge == "none" and [s.name for s in r.steps] == ["answer"]


def test_load_errors_name_what_was_looked_for(tmp_path, tiny):
    with pytest.raises(LookupError, match="unknown model 'no-such-model'.*known: demo"):
        ecso.load("no-such-model")
    partial = tmp_path / "half-export"
    partial.mkdir()
    shutil.copy(tiny.llm, partial / "llm.gguf")
    with pytest.raises(LookupError, match="looked for llm.gguf, mmproj.gguf, ecso.json, missing mmproj.gguf, ecso.json"):
        ecso.load(partial)
    with pytest.raises(InputError, match="unknown setting.*n_ctxx"):
        ecso.load("demo", n_ctxx=512)
    with pytest.raises(ModelError, match="not found|No such"):
        ecso.load(str(tmp_path / "missing.gguf"))


def test_import_ecso_is_light_and_finds_subpackages_from_the_source_tree():
    code = ("import sys, ecso; assert 'llama_cpp' not in sys.modules and 'torch' not in sys.modules, 'heavy'; "
            "import ecso.runtime, ecso.cli.run; assert 'torch' not in sys.modules; "
            "print(ecso.__file__); print(ecso.load.__module__, ecso.Ecso.__name__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(REPO / "ecso" / "__init__.py"), "ecso", "Ecso"]


@pytest.mark.slow
def test_plain_pip_install_works_inside_and_outside_the_source_tree(tmp_path):
    """`pip install .` (not editable) into a folder, then Python without any .pth (so no editable finder): the
    installed `ecso` must work, and from the repo root (where ./ecso shadows it) the installed subpackages too."""
    target = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target),
                          str(REPO)], capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr
    assert (target / "ecso" / "__init__.py").exists() and (target / "ecso" / "runtime" / "ecso.py").exists()
    # the dependencies (llama_cpp, numpy, ...) from this interpreter's site folders, but none of their .pth files
    env_path = ":".join([str(target), *site.getsitepackages()])
    code = ("import sys, ecso, ecso.runtime, ecso.models.registry; "
            "m = ecso.load('demo', max_tokens=4, n_ctx=2048, defense=False); "
            f"r = m.run({STREET!r}, 'Describe it.'); m.close(); "
            "print(ecso.__file__); print(ecso.runtime.__file__); print(bool(r.answer))")
    for cwd, expect_init in ((REPO, REPO / "ecso"), (tmp_path, target / "ecso")):
        r = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=cwd, timeout=300,
                           env={**os.environ, "PYTHONPATH": env_path})
        assert r.returncode == 0, r.stderr
        init, runtime, answered = r.stdout.split()
        assert init == str(expect_init / "__init__.py")
        assert runtime == str(target / "ecso" / "runtime" / "__init__.py")
        assert answered == "True"

