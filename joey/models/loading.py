"""A resolved model source (``joey.models.registry.ModelSource``) → a ``LlamaModel``: a GGUF read in
place (``joey.models.gguf_load``) or a Hugging Face folder's float weights (``joey.models.weights``).
Above both, since the GGUF loader builds on the folder loader's pieces."""

from __future__ import annotations

import torch

from joey.models.gguf_load import load_gguf
from joey.models.llama import LlamaModel
from joey.models.registry import ModelSource
from joey.models.weights import check_weights, load_model, set_format


def load_source(source: ModelSource, device: torch.device, dtype: torch.dtype, weights: str | None,
                progress: bool = True) -> LlamaModel:
    """The model of a resolved source: a GGUF read in place (joey.models.gguf_load) or a folder's
    float weights, its linears in format ``weights`` (None: plain float linears)."""
    if weights is not None:
        check_weights(weights)
    if source.in_place:
        return load_gguf(source, device, dtype, weights, progress)
    model = load_model(source.folder, device, dtype)
    if weights is not None:
        set_format(model, source.folder, weights, progress)
    return model
