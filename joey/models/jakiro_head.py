"""Jakiro's draft head (arXiv 2502.06282): a one-layer network over the target's own features.

Input at position j: ``fc([embed(x_{j+1}); f_j])`` — the next token's embedding (the target's frozen
embedding) joined with the target's final-norm feature of position j. One decoder layer follows:
attention (RoPE, its own one-layer KV cache), then a mixture of SwiGLU experts. The gate has
``experts + 2`` outputs:

- the first ``experts`` (softmax) mix the experts: the *normal* branch, predicting f_{j+1};
- the last two (sigmoid) weigh a *contrastive* branch ``w_hi · E_hi − w_lo · E_lo`` between the
  expert the gate prefers and the one it likes least, predicting f_{j+2} (one step further), which
  lets the drafter skip a forward for the last tree level (Jakiro's hybrid inference).

A predicted feature becomes draft logits through the target's LM head restricted to a draft
vocabulary (FR-Spec, arXiv 2502.14856): rows ``vocab`` of the target's head. Verification always
uses the target's full vocabulary, so the restriction costs acceptance, never correctness.
The head's own parameters (fc, the layer, the gate and experts, the vocabulary) are what a head
file holds; the embedding and LM head are the target's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from joey.errors import ModelFormatError
from joey.models.config import ModelConfig
from joey.models.draft_files import find_shipped, load_checked, read_meta, save_draft_file
from joey.models.kv_cache import KVCache
from joey.models.llama import MLP, Attention, Linear, LlamaModel, RMSNorm, RowSpan
from joey.models.weight_formats import make_kernel

FORMAT = "joey-jakiro-head/1"


@dataclass(frozen=True)
class HeadOutput:
    """The head's two predictions for each input position."""

    next: torch.Tensor  # [N, hidden] predicted f_{j+1} (normal branch)
    after_next: torch.Tensor  # [N, hidden] predicted f_{j+2} (contrastive branch)


class JakiroHead(nn.Module):
    """fc → attention → mixture of experts with a contrastive gate; see the module docstring."""

    def __init__(
        self, cfg: ModelConfig, vocab: torch.Tensor, experts: int = 2, intermediate: int | None = None
    ) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.cfg = replace(cfg, intermediate_size=intermediate or cfg.intermediate_size)
        self.num_experts = experts
        self.fc = Linear(2 * h, h, bias=True)
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.self_attn = Attention(self.cfg)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.gate = Linear(h, experts + 2, bias=False)
        self.experts = nn.ModuleList(MLP(self.cfg) for _ in range(experts))
        self.register_buffer("vocab", vocab.clone().long())  # [draft_vocab] target token ids

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        p = self.fc.weight
        return KVCache(1, batch, self.cfg.num_kv_heads, max_len, self.cfg.head_dim, dtype=p.dtype, device=p.device)

    def prepack(self, low_bit: str | None = None) -> None:
        """Inference kernels for every linear layer on CPU: oneDNN-packed in the head's dtype (fp32 or
        bf16), or with ``low_bit`` ("int8") the fc, attention and expert weights quantized onto
        joey's low-bit kernel (the 4-output gate stays float)."""
        self.gate.prepack()
        if low_bit is None:
            self.fc.prepack()
            self.self_attn.prepack()
            for e in self.experts:
                e.prepack()
            return
        self.fc.kernel = make_kernel(low_bit, self.fc.weight, self.fc.bias)
        self.self_attn.set_weights(low_bit)
        for e in self.experts:
            e.set_weights(low_bit)

    def forward(
        self,
        embeds: torch.Tensor,  # [B*T, hidden] target embeddings of x_{j+1}
        features: torch.Tensor,  # [B*T, hidden] f_j: target features, or the head's own predictions
        shape: tuple[int, int],  # (B, T)
        cos: torch.Tensor,  # [B*T, 1, head_dim]
        sin: torch.Tensor,
        cache: KVCache,
        slots: int | torch.Tensor,
        kv_len: int,
        mask: torch.Tensor | None,  # [B, 1, T, kv_len]; None = causal
    ) -> HeadOutput:
        x = self.fc(torch.cat([embeds, features], dim=-1))
        x = x + self.self_attn(self.input_layernorm(x), shape, cos, sin, cache.k[0], cache.v[0], slots, kv_len, mask)
        return self._experts(x)

    def forward_rows(
        self,
        embeds: torch.Tensor,  # [N, hidden] several rows' inputs, packed row after row
        features: torch.Tensor,  # [N, hidden]
        cos: torch.Tensor,  # [N, 1, head_dim]
        sin: torch.Tensor,
        rows: Sequence[RowSpan],  # each row's share of the inputs and its own one-layer head cache
    ) -> HeadOutput:
        """``forward`` for rows that each keep their own cache (one drafter per row): fc, gate and
        experts run once on all packed inputs, attention per row."""
        x = self.fc(torch.cat([embeds, features], dim=-1))
        x = x + self.self_attn.forward_rows(self.input_layernorm(x), cos, sin, rows, 0)
        return self._experts(x)

    def _experts(self, x: torch.Tensor) -> HeadOutput:
        """The mixture of experts and the contrastive branch on the states after attention [N, hidden]."""
        y = self.post_attention_layernorm(x)
        gate = self.gate(y)  # [N, experts + 2]
        mix = gate[:, : self.num_experts].softmax(-1)  # [N, experts]
        outs = torch.stack([e(y) for e in self.experts], dim=1)  # [N, experts, hidden]
        nxt = x + (mix.unsqueeze(-1) * outs).sum(1)
        order = mix.argsort(-1, descending=True)
        hi = outs.gather(1, order[:, :1, None].expand(-1, 1, outs.shape[-1])).squeeze(1)
        lo = outs.gather(1, order[:, -1:, None].expand(-1, 1, outs.shape[-1])).squeeze(1)
        w = gate[:, self.num_experts :].sigmoid()  # [N, 2]: w_hi, w_lo
        return HeadOutput(nxt, x + w[:, :1] * hi - w[:, 1:] * lo)


def save_head(head: JakiroHead, model: LlamaModel, path: str | Path, extra: dict | None = None) -> None:
    meta = {"format": FORMAT, "experts": head.num_experts, "intermediate": head.cfg.intermediate_size, **(extra or {})}
    save_draft_file(head.state_dict(), head.vocab, model, path, meta)


def read_head_meta(path: str | Path) -> dict:
    return read_meta(path, FORMAT, "Jakiro head")


def load_head(path: str | Path, model: LlamaModel) -> JakiroHead:
    """Read a head file and check that it belongs to ``model``; ModelFormatError otherwise."""
    meta, state = load_checked(path, model, FORMAT, "Jakiro head")
    experts, inter = meta.get("experts"), meta.get("intermediate")
    if not isinstance(experts, int) or not isinstance(inter, int) or experts < 2 or inter < 1:
        raise ModelFormatError(f"{path}: invalid head settings (experts={experts!r}, intermediate={inter!r})")
    head = JakiroHead(model.cfg, state["vocab"], experts, inter)
    try:
        head.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelFormatError(f"{path}: head weights do not fit this model ({str(exc).splitlines()[0][:120]})")
    return head.to(model.device, model.dtype).eval()


def find_head(model: LlamaModel, folder: Path | None = None) -> Path | None:
    """The head shipped inside joey (``joey/heads/*.safetensors``) that matches ``model``, if any."""
    folder = folder or Path(__file__).resolve().parent.parent / "heads"
    return find_shipped(model, folder, FORMAT, "Jakiro head")
