"""The heads runtime without torch: import hygiene, explicit execution-provider choice (including onnxruntime-gpu's
silent CPU fallback), and clear errors for unusable head folders."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest

from conftest import run_python


@pytest.fixture(scope="module")
def linear_onnx(tmp_path_factory):
    """A one-node ONNX graph (y = x W^T + b) written with onnx.helper: enough to open sessions."""
    from onnx import TensorProto, helper, numpy_helper, save

    w = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "w")
    b = numpy_helper.from_array(np.array([0.5, -0.5], np.float32), "b")
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)], "linear",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])], [w, b])
    path = tmp_path_factory.mktemp("linear") / "linear.onnx"
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(path))
    return path


def test_runtime_heads_never_import_torch_or_transformers(tmp_path):
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (420, 120), "white")
    ImageDraw.Draw(img).text((20, 30), "NO TORCH", fill="black", font=ImageFont.load_default(size=40))
    img.save(tmp_path / "t.png")
    code = textwrap.dedent(f"""
        import sys
        import ecso.runtime.heads as h
        from ecso.runtime import Heads
        from ecso.runtime.images import load_image
        assert "torch" not in sys.modules and "transformers" not in sys.modules, "import"
        out = h.load_caption_head("ocr").caption(load_image({str(tmp_path / "t.png")!r}))
        print(out.text)
        bad = sorted(m for m in ("torch", "transformers", "optimum") if m in sys.modules)
        assert not bad, bad
    """)
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == 'The image contains the text: "NO TORCH"'


def test_auto_provider_is_the_cpu_here_and_says_so(linear_onnx):
    from ecso.runtime.heads import open_session, requested_providers

    wanted, strict = requested_providers("auto")
    assert wanted == ["CPUExecutionProvider"] and not strict  # this onnxruntime offers no GPU provider
    sess, provider = open_session(linear_onnx)
    assert provider == "cpu"
    y = sess.run(None, {"x": np.ones((1, 3), np.float32)})[0]
    assert y.tolist() == [[3.5, 11.5]]


def test_advertised_cuda_that_cannot_load_falls_back_to_cpu(linear_onnx, monkeypatch):
    """onnxruntime-gpu on a machine without CUDA lists CUDAExecutionProvider, then silently runs on the CPU:
    auto must report the provider the session really has, and an explicit cuda must fail."""
    import onnxruntime as ort

    from ecso.runtime.heads import HeadError, open_session, requested_providers

    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    wanted, _ = requested_providers("auto")
    assert wanted == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    sess, provider = open_session(linear_onnx, "auto")
    assert provider == "cpu" and sess.get_providers()[0] == "CPUExecutionProvider"
    with pytest.raises(HeadError, match="CUDAExecutionProvider was requested but the session runs on "
                                        "CPUExecutionProvider"):
        open_session(linear_onnx, "cuda")


def test_provider_names_are_checked(linear_onnx):
    from ecso.runtime.errors import InputError
    from ecso.runtime.heads import open_session, requested_providers, short_provider

    assert requested_providers("coreml,cpu") == (["CoreMLExecutionProvider", "CPUExecutionProvider"], True)
    assert requested_providers(["cpu"]) == (["CPUExecutionProvider"], True)
    assert short_provider("CUDAExecutionProvider") == "cuda"
    assert short_provider("DmlExecutionProvider") == "dml"
    with pytest.raises(InputError, match="unknown execution provider 'gpu'"):
        open_session(linear_onnx, "gpu")
    assert open_session(linear_onnx, "cpu")[1] == "cpu"


def test_unusable_head_folders_give_one_line_errors(tmp_path, linear_onnx):
    from ecso.runtime.errors import ModelError
    from ecso.runtime.heads import MANIFEST, HeadError, load_caption_head, load_judge_head

    with pytest.raises(HeadError, match="head folder not found"):
        load_judge_head(tmp_path / "missing")
    with pytest.raises(HeadError, match=f"has no {MANIFEST}"):
        load_judge_head(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(HeadError, match="not valid JSON"):
        load_judge_head(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(HeadError, match="expected 'ecso-head/1'"):
        load_judge_head(tmp_path)
    manifest = {"format": "ecso-head/1", "kind": "judge", "files": {"model": "model.onnx",
                                                                   "tokenizer": "tokenizer.json"},
                "judge": {"unsafe_index": 1}}
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(HeadError, match="model.onnx is missing"):
        load_judge_head(tmp_path)
    with pytest.raises(HeadError, match="holds a judge head, not a caption head"):
        load_caption_head(tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"not an onnx graph")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(HeadError, match="onnxruntime cannot load") as e:
        load_judge_head(tmp_path)
    assert isinstance(e.value, ModelError) and "\n" not in str(e.value)
