"""ecso: ECSO (Eyes Closed, Safety On) for multimodal LLMs on llama.cpp.

    import ecso
    model = ecso.load("demo")                  # a registry name, a GGUF file (+ mmproj), or an export folder
    print(model.run("photo.png", "What should I do with this?").answer)
    remote = ecso.load("http://127.0.0.1:8080/v1", model="NAME")   # an OpenAI-compatible server

Importing `ecso` is light: nothing heavy loads until `load` is called (llama.cpp then; never torch).
"""

from __future__ import annotations

from pkgutil import extend_path
from typing import TYPE_CHECKING, Any, Optional

# The subpackages (ecso.runtime, ecso.cli, ...) live in their own top-level folders of the source tree and install
# under this package. When Python runs from the source tree, this folder shadows the installed `ecso`; extending
# __path__ with every `ecso` folder on sys.path keeps the installed subpackages importable then.
__path__ = extend_path(__path__, __name__)

if TYPE_CHECKING:
    from ecso.runtime import Ecso

__all__ = ["load", "Ecso", "EcsoOptions", "EngineConfig", "RemoteConfig", "Heads", "Result", "StepEvent", "EcsoError"]
_RUNTIME_NAMES = frozenset(__all__) - {"load"}


def load(name_or_path: str, mmproj: Optional[str] = None, **config: Any) -> "Ecso":
    """A ready `Ecso` for a model given by name or path; load once, then `run` / `stream` many requests.

    `name_or_path`: a registry name (`demo`, or one added with `ecso models add`; see `ecso models`), an LLM GGUF
    file (then pass its `mmproj`, or none for text only), or a folder written by `ecso export llava` (llm.gguf +
    mmproj.gguf + ecso.json). `config`: any EngineConfig field (n_ctx, n_gpu_layers, ...) or EcsoOptions field
    (judge, max_tokens, ...); `options=` / `heads=` pass whole EcsoOptions / Heads objects.
    `name_or_path` may also be an OpenAI-compatible server's API base (`http://HOST:PORT/v1`): then `model=` names
    the server's model, and `config` takes RemoteConfig fields (api_key, timeout_s, retries, parallel) and
    EcsoOptions fields; the steps run on that server (API key default: $ECSO_BACKEND_API_KEY).
    Raises LookupError (ecso.models.registry.UnknownModel) naming what was looked for, InputError for an unknown
    setting, ModelError for files llama.cpp cannot use.
    """
    from dataclasses import fields, replace

    from ecso.runtime import Ecso, EcsoOptions, EngineConfig, Heads, InputError
    from ecso.runtime.remote import RemoteConfig, is_backend_url

    options = config.pop("options", None) or EcsoOptions()
    heads = config.pop("heads", None) or Heads()
    option_keys = {f.name for f in fields(EcsoOptions)}
    if is_backend_url(str(name_or_path)):
        remote_keys = {f.name for f in fields(RemoteConfig)} - {"url"}
        unknown = sorted(set(config) - remote_keys - option_keys)
        problem = ("model= is missing" if "model" not in config else "mmproj does not apply to a server"
                   if mmproj is not None else f"unknown setting(s) {', '.join(unknown)}" if unknown else "")
        if problem:
            raise InputError(f"ecso.load(URL, model=NAME, ...): {problem}; it takes RemoteConfig fields "
                             f"({', '.join(sorted(remote_keys))}) and EcsoOptions fields")
        remote = RemoteConfig(url=str(name_or_path), **{k: v for k, v in config.items() if k in remote_keys})
        options = replace(options, **{k: v for k, v in config.items() if k in option_keys})
        options.validate()
        return Ecso(remote, options, heads)

    from ecso.models.registry import locate

    engine_keys = {f.name for f in fields(EngineConfig)} - {"model", "mmproj"}
    unknown = sorted(set(config) - engine_keys - option_keys)
    if unknown:
        raise InputError(f"unknown setting(s) {', '.join(unknown)}; ecso.load takes EngineConfig fields "
                         f"({', '.join(sorted(engine_keys))}) and EcsoOptions fields ({', '.join(sorted(option_keys))})")
    entry = locate(str(name_or_path), str(mmproj) if mmproj is not None else None)
    engine_kw = {k: v for k, v in config.items() if k in engine_keys}
    engine_kw.setdefault("chat_format", entry.chat_format)
    options = replace(options, **{k: v for k, v in config.items() if k in option_keys})
    options.validate()
    return Ecso(EngineConfig(model=entry.model, mmproj=entry.mmproj, **engine_kw), options, heads)


def __getattr__(name: str) -> Any:
    """`ecso.Ecso`, `ecso.EcsoOptions`, ...: the runtime's main types, imported on first use."""
    if name in _RUNTIME_NAMES:
        import ecso.runtime

        return getattr(ecso.runtime, name)
    raise AttributeError(f"module 'ecso' has no attribute {name!r}")
