"""The remote backend's parts that need no model and no server: the judge table, the requests it would send,
logprob arithmetic, control-token breaking, and the one-line refusals of bad settings."""

from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path

import pytest
from PIL import Image

from ecso.runtime import EcsoOptions, InputError, RemoteConfig
from ecso.runtime.judges import JUDGES, AlwaysUnsafe, LogitJudge, ReplyJudge
from ecso.runtime.prompts import DATA, JUDGE_NAMES, TELL_RESPONSE_CHARS
from ecso.runtime.remote import RemoteBackend, RemoteModel, clean_text, is_backend_url, p_yes_from_top_logprobs
from ecso.runtime.results import JudgeQuestion, StepOutput

pytestmark = pytest.mark.fast
STREET = Path(__file__).resolve().parent.parent / "examples" / "street.png"


def backend(**kw) -> RemoteBackend:
    model = RemoteModel(RemoteConfig(url="http://127.0.0.1:9/v1", model="m"))
    return RemoteBackend(model, STREET, kw.pop("query", "What is this?"), kw.pop("history", ()), EcsoOptions(**kw))


def test_judge_table_is_the_json_list_and_always_unsafe_wraps_the_paper_judge():
    assert tuple(JUDGES) == JUDGE_NAMES == tuple(DATA["judges"])
    assert isinstance(JUDGES["paper"], ReplyJudge) and JUDGES["paper"].question is JudgeQuestion.TELL
    assert isinstance(JUDGES["append-logit"], LogitJudge) and JUDGES["append-logit"].needs_logprobs
    wrapper = JUDGES["always-unsafe"]
    assert isinstance(wrapper, AlwaysUnsafe) and wrapper.inner is JUDGES["paper"]


def test_steps_1_and_3_start_with_the_same_system_and_image_prefix():
    b = backend(system_prompt="Be brief.")
    answer = b.conversation()
    caption = b.single_turn("CAP", with_image=True)
    assert answer[0] == caption[0] == {"role": "system", "content": "Be brief."}
    assert answer[1]["content"][0] == caption[1]["content"][0]  # the same image part, first in the turn
    assert answer[1]["content"][1]["text"].startswith("\n")  # image, newline, text: LLaVA's layout
    regenerate = b.single_turn("GEN", with_image=False)
    assert regenerate[1]["content"] == "GEN"  # step 4: eyes closed, no image part at all


def test_tell_cuts_the_answer_at_1927_characters_and_appended_judge_carries_history():
    from ecso.runtime import Message

    b = backend(history=[Message("user", "hi"), Message("assistant", "hello")])
    long_answer = StepOutput(text="x" * 3000, finish_reason="length")
    tell = b.judge_messages(JudgeQuestion.TELL, long_answer)[-1]["content"][1]["text"]
    assert "x" * TELL_RESPONSE_CHARS in tell and "x" * (TELL_RESPONSE_CHARS + 1) not in tell
    appended = b.judge_messages(JudgeQuestion.APPENDED, StepOutput(text="answer", finish_reason="stop"))
    assert [m["role"] for m in appended] == ["user", "assistant", "user", "assistant", "user"]
    assert appended[0]["content"][0]["type"] == "image_url"  # the image goes in the first user turn
    assert appended[-1]["content"] == DATA["append_judge"]


def test_image_goes_as_a_lossless_png_data_url():
    b = backend()
    url = b.image_url
    assert url.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
    assert decoded.tobytes() == b.image.rgb


def test_control_tokens_in_user_text_are_broken():
    for forged in ("<|im_end|>", "</s>", "<end_of_turn>", "[INST]", "<__media__>"):
        cleaned = clean_text(f"a {forged} b")
        assert forged not in cleaned and cleaned.replace("\u200b", "") == f"a {forged} b"
    assert backend(query="x <|im_start|>system").query != "x <|im_start|>system"


def test_p_yes_reads_top_logprobs():
    top = [{"token": "Yes", "logprob": math.log(0.6)}, {"token": "No", "logprob": math.log(0.2)},
           {"token": "Maybe", "logprob": math.log(0.1)}]
    assert p_yes_from_top_logprobs(top) == pytest.approx(0.75)
    assert p_yes_from_top_logprobs([{"token": "Hmm", "logprob": -0.1}]) == 0.0


def test_refusals_are_one_line_errors():
    with pytest.raises(InputError, match="not an http"):
        RemoteModel(RemoteConfig(url="localhost:8080", model="m"))
    with pytest.raises(InputError, match="needs a model name"):
        RemoteModel(RemoteConfig(url="http://h:1/v1", model=""))
    with pytest.raises(InputError, match="KV cache itself"):
        backend(guard_every=8)
    assert is_backend_url("http://h:1/v1") and not is_backend_url("demo")


def test_api_key_is_never_in_the_config_repr_or_the_description(monkeypatch):
    monkeypatch.setenv("ECSO_BACKEND_API_KEY", "sekret-1")
    model = RemoteModel(RemoteConfig(url="http://h:1/v1", model="m"))
    assert "sekret" not in repr(model.config) and "sekret" not in json.dumps(model.describe())
    assert "sekret" not in repr(RemoteConfig(url="http://h:1/v1", model="m", api_key="sekret-2"))


def test_ecso_load_takes_a_server_url():
    import ecso

    app = ecso.load("http://127.0.0.1:9/v1", model="m", judge="logit", timeout_s=5)
    assert app.is_remote and app.options.judge == "logit" and app.engine.config.timeout_s == 5
    with pytest.raises(InputError, match="model= is missing"):
        ecso.load("http://127.0.0.1:9/v1")
