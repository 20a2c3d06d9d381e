"""Typed exceptions of the engine. Every message names the input or file, what was expected and what came."""
from __future__ import annotations


class AtelierError(Exception):
    """Base class of every error the pack raises on purpose."""


class InputError(AtelierError, ValueError):
    """A node or function input is not what it should be (shape, range, type)."""


class ModelPathError(AtelierError):
    """A model name does not resolve to a file inside its folder (missing, or escapes the folder)."""


class UnsafeFileError(AtelierError):
    """A model file asks to run code or to import something outside the allow-list; nothing of it ran."""


class ModelLoadError(AtelierError):
    """A model file could not be read (truncated, corrupted, not a model)."""


class UnknownModelError(AtelierError):
    """No detector recognised the state dict."""


class WrongFamilyError(AtelierError):
    """A model of one family was given to a node of another (e.g. a VAE to an upscaler)."""


class TilingError(AtelierError):
    """Tiled processing ran out of memory at every tile size it tried."""


class MemoryBudgetError(AtelierError):
    """A request would need more memory than is free; refused before allocating (the message says both)."""
