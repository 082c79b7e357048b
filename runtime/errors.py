"""Errors the runtime raises. Each message is one line that says what is wrong and what to do."""

from __future__ import annotations


class EcsoError(Exception):
    """Base class: anything the user can fix (bad input, missing model, too little context)."""

    exit_code = 1


class InputError(EcsoError):
    """A bad request: empty or over-long query, unreadable image, unsupported format."""

    exit_code = 2


class ImageError(InputError):
    """An image that cannot be used: missing, corrupt, not an image, too large."""


class ModelError(EcsoError):
    """A model file that cannot be loaded: missing, not GGUF, truncated, or an mmproj that does not fit."""

    exit_code = 3


class ContextOverflowError(InputError):
    """The prompt plus the requested output does not fit the context window."""


class EngineError(EcsoError):
    """llama.cpp reported a failure while decoding; the engine state was reset."""

    exit_code = 4


class Cancelled(EcsoError):
    """The caller cancelled the request (its `should_cancel` returned True); the engine is free again."""
