"""ecso.runtime: ECSO on llama.cpp. Needs only llama-cpp-python, numpy and pillow (onnxruntime for ONNX heads).

    from ecso.runtime import Ecso, EngineConfig
    with Ecso(EngineConfig(model="llm.gguf", mmproj="mmproj.gguf")) as ecso:
        print(ecso.run("photo.png", "What is this?").answer)
"""

from ecso.runtime.api import Ecso
from ecso.runtime.ecso import JUDGES, EcsoOptions, Heads, Result, StepEvent, StepTrace, run, stream
from ecso.runtime.engine import Engine, EngineConfig, Generation, Sampling
from ecso.runtime.errors import (Cancelled, ContextOverflowError, EcsoError, EngineError, ImageError, InputError,
                                 ModelError)
from ecso.runtime.images import ImageLimits, LoadedImage, load_image
from ecso.runtime.prompts import PROMPT_VERSION, Message
from ecso.runtime.remote import BackendError, RemoteConfig

__all__ = [
    "Ecso", "EcsoOptions", "Heads", "Engine", "EngineConfig", "Generation", "Sampling", "Result", "StepEvent", "StepTrace",
    "run", "stream", "JUDGES", "Message", "PROMPT_VERSION", "ImageLimits", "LoadedImage", "load_image",
    "RemoteConfig", "BackendError", "Cancelled", "EcsoError", "InputError", "ImageError", "ModelError",
    "ContextOverflowError", "EngineError",
]
