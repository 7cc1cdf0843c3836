"""Typed exceptions for every user-facing failure, so the CLI and server can print one clear line.

All of them derive from ``JoeyError``; the CLI catches exactly that type and exits with status 2.
Anything else that escapes is a bug in joey, not a user error.
"""

from __future__ import annotations


class JoeyError(Exception):
    """Base class of all errors caused by user input or the user's environment."""


class InvalidArgumentError(JoeyError, ValueError):
    """A parameter is out of range or of the wrong kind (temperature < 0, top-p outside (0, 1], ...)."""


class ModelNotFoundError(JoeyError):
    """The model path, file or hub id does not exist or cannot be reached."""


class ModelFormatError(JoeyError):
    """A model file exists but cannot be read: corrupt GGUF, truncated safetensors, bad config.json."""


class UnsupportedArchitectureError(JoeyError):
    """The model's architecture is not one the compact decoder implements."""


class PromptError(JoeyError):
    """The prompt is empty or does not fit in the model's context window."""


class MissingDependencyError(JoeyError):
    """An optional component (llama-cpp-python, ...) that the requested feature needs is not installed."""
