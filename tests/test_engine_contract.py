"""The engine keeps its contract (lock, closed engine, chat templates checked before loading) and sampling at
temperature > 0 is deterministic per seed and untouched by the guard."""

from __future__ import annotations

import threading

import pytest

from conftest import run_python
from ecso.runtime import EcsoOptions, Engine, EngineConfig, EngineError, ModelError, Sampling, run
from ecso.runtime.engine import Prompt
from ecso.runtime.kv import TextPiece
from ecso.runtime.prompts import ChatTemplateError, JinjaFormat, Message, chat_format_for

QUERY = "What is shown in this picture?"
NEVER_UNSAFE = dict(judge="logit", logit_threshold=1.01)


def _calls(engine, image, sampler) -> dict:
    """One call of every public Engine method and property."""
    prompt = Prompt([TextPiece((1, 2))], {})
    return {
        "has_vision": lambda: engine.has_vision, "n_past": lambda: engine.n_past,
        "token_text": lambda: engine.token_text(1), "tokenize": lambda: engine.tokenize("hi", True),
        "single_token_ids": lambda: engine.single_token_ids(("yes",)), "token_bytes": lambda: engine.token_bytes(1),
        "detokenize": lambda: engine.detokenize([1, 2]), "clean_user_text": lambda: engine.clean_user_text("x"),
        "load_image": lambda: engine.load_image(image), "image_key": lambda: engine.image_key(image),
        "build_prompt": lambda: engine.build_prompt([Message("user", "hi")]),
        "has_encoded": lambda: engine.has_encoded(image), "check_budget": lambda: engine.check_budget(prompt, 4),
        "reset": engine.reset, "rollback": lambda: engine.rollback(0), "prefill": lambda: engine.prefill(prompt),
        "logits": engine.logits, "append_tokens": lambda: engine.append_tokens([1]),
        "sampler": lambda: engine.sampler(Sampling()), "generate": lambda: engine.generate(Sampling(max_tokens=2)),
        "sample_next": lambda: engine.sample_next(sampler), "chat": lambda: engine.chat([Message("user", "hi")]),
        "describe": engine.describe, "cancellable": lambda: engine.cancellable(None),
        "image_embeddings": lambda: engine.image_embeddings(None, True),
    }


def _public_names() -> set[str]:
    return {n for n, m in vars(Engine).items() if not n.startswith("_") and (callable(m) or isinstance(m, property))}


def test_every_public_method_refuses_a_closed_engine(tiny, street_png):
    engine = Engine(EngineConfig(str(tiny.llm), str(tiny.mmproj), n_ctx=256))
    image = engine.load_image(street_png)
    sampler = engine.sampler(Sampling())
    calls = _calls(engine, image, sampler)
    assert set(calls) == _public_names() - {"close"}  # a new public method must join this contract
    engine.close()
    engine.close()  # twice is fine
    for name, call in calls.items():
        with pytest.raises(EngineError, match="closed"):
            call()
        assert name  # (the name shows in the traceback when a call does not raise)
    sampler.close()


def test_every_public_method_waits_for_the_lock(tiny_engine):
    for name in _public_names() - {"close"}:
        member = vars(Engine)[name]
        assert hasattr(member.fget if isinstance(member, property) else member, "__wrapped__"), name
    held, release, done = threading.Event(), threading.Event(), threading.Event()

    def holder():
        with tiny_engine.lock:
            held.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(10)
    worker = threading.Thread(target=lambda: (tiny_engine.tokenize("hi", True), done.set()))
    worker.start()
    assert not done.wait(0.3)  # blocked while another thread holds the engine
    release.set()
    assert done.wait(10)
    t.join()
    worker.join()


# --- chat templates --------------------------------------------------------------------------------------------------
DROPS_ASSISTANT = ("{% for m in messages %}{% if m['role'] == 'user' %}U: {{ m['content'] }}\n{% else %}A: (hidden)\n"
                   "{% endif %}{% endfor %}A:")


@pytest.mark.fast
def test_template_that_drops_the_content_is_refused():
    with pytest.raises(ChatTemplateError, match="user's message"):
        JinjaFormat("{% for m in messages %}[{{ m['role'] }}]{% endfor %}").prompt([Message("user", "hi")], True)
    with pytest.raises(ChatTemplateError, match="user's message"):
        chat_format_for("gguf", "fixed text", "<s>", "</s>", True)


@pytest.mark.fast
def test_continuation_raises_when_the_answer_is_not_in_the_rendered_conversation():
    fmt = JinjaFormat(DROPS_ASSISTANT)
    msgs = [Message("user", "q"), Message("assistant", "the answer"), Message("user", "judge it")]
    assert fmt.prompt(msgs, image=False).text.endswith("A: (hidden)\nU: judge it\nA:")
    with pytest.raises(ChatTemplateError, match="assistant's answer"):
        fmt.after_assistant(msgs, image=False)
    ok = JinjaFormat(DROPS_ASSISTANT.replace("(hidden)", "{{ m['content'] }}"))
    assert ok.after_assistant(msgs, image=True) == "\nU: judge it\nA:"


def _header_only_gguf(path, template: str) -> str:
    """A GGUF with metadata but no tensors: llama.cpp cannot load it, so an error about the template proves the
    template was checked first."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_chat_template(template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.mark.parametrize("template, chat_format, message", [
    ("{% for m in messages %}{{ m['content'] }", "auto", "not valid Jinja"),
    ("{{ raise_exception('no') }}", "auto", "refused the conversation"),
    ("{% for m in messages %}{{ m['content'] }}{% endfor %}", "chatml-please", "unknown chat format"),
])
def test_bad_chat_format_fails_before_the_model_loads(tmp_path, template, chat_format, message):
    model = _header_only_gguf(tmp_path / "m.gguf", template)
    code = (f"from ecso.runtime import Engine, EngineConfig, ModelError\n"
            f"try:\n    Engine(EngineConfig({model!r}, chat_format={chat_format!r}))\n"
            f"except ModelError as e:\n    print('ERR', e)\n")
    r = run_python(code)
    assert r.returncode == 0, r.stderr[-2000:]
    assert message in r.stdout and "could not load" not in r.stdout, r.stdout


@pytest.mark.fast
def test_unknown_chat_format_is_a_model_error():
    with pytest.raises(ModelError, match="unknown chat format"):
        chat_format_for("vicuna", None, "<s>", "</s>", True)


# --- sampling at temperature > 0 -------------------------------------------------------------------------------------
def test_same_seed_gives_the_same_text_at_temperature(demo_engine, street_png):
    opts = dict(NEVER_UNSAFE, max_tokens=24, temperature=0.7)
    a = run(demo_engine, street_png, QUERY, EcsoOptions(**opts, seed=7))
    b = run(demo_engine, street_png, QUERY, EcsoOptions(**opts, seed=7))
    others = {run(demo_engine, street_png, QUERY, EcsoOptions(**opts, seed=s)).initial_answer for s in (8, 9)}
    assert a.initial_answer == b.initial_answer
    assert others != {a.initial_answer}  # the temperature really samples


def test_guard_that_never_fires_changes_nothing_at_temperature(demo_engine, street_png):
    opts = dict(NEVER_UNSAFE, max_tokens=24, temperature=0.7, seed=11)
    plain = run(demo_engine, street_png, QUERY, EcsoOptions(**opts))
    guarded = run(demo_engine, street_png, QUERY, EcsoOptions(**opts, guard_every=3, guard_threshold=1.01))
    guard = [s for s in guarded.steps if s.name == "guard"][0]
    assert guard.generated_tokens >= 2  # the guard paused the answer and judged it more than once
    assert guarded.initial_answer == plain.initial_answer and not guarded.retracted
