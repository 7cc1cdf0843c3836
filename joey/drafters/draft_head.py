"""The target's LM head restricted to a draft vocabulary (FR-Spec, arXiv 2502.14856).

On a small target the full head is a large share of the weights, so a draft network scores only
the most frequent tokens of its training answers. Verification always uses the full vocabulary,
so the restriction can cost acceptance but never change the output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from joey.models.llama import LlamaModel, float_format
from joey.models.weight_formats import LinearKernel, make_kernel


@dataclass(frozen=True)
class DraftVocabHead:
    """Rows ``vocab`` of the target's float LM head, pre-packed for oneDNN on CPU (fp32 or bf16) or
    quantized onto joey's low-bit kernel."""

    vocab: torch.Tensor  # [draft_vocab] target token ids
    weight: torch.Tensor  # [draft_vocab, hidden]
    kernel: LinearKernel | None

    @classmethod
    def build(cls, model: LlamaModel, vocab: torch.Tensor, dtype: torch.dtype | None = None,
              low_bit: str | None = None) -> DraftVocabHead:
        """``dtype``: the drafting precision (default: the target's activations'); ``low_bit``
        ("int8"): the rows quantized onto joey's low-bit kernel instead of a float kernel."""
        vocab = vocab.to(model.device)
        weight = model.head_rows(vocab).to(dtype or model.dtype).contiguous()
        kernel = None
        if weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16) and \
                torch.backends.mkldnn.is_available():
            kernel = make_kernel(low_bit or float_format(weight.dtype), weight)
        return cls(vocab, weight, kernel)

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """States [N, hidden] → draft logits over the draft vocabulary [N, draft_vocab] (fp32)."""
        if self.kernel is not None:
            return self.kernel(states.to(self.weight.dtype)).float()
        return (states @ self.weight.T).float()
