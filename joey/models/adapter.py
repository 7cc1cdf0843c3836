"""Kangaroo's adapter: the small trained network that turns the target's shallow hidden states into
a draft model (Kangaroo, arXiv 2404.18911, Sec. 3).

draft(x) = LM_head(norm(h + attn(input_norm(h)))),  h = layers[0, l)(x) of the target itself.

The adapter is one attention block (RoPE, its own KV cache, no MLP) between two RMSNorms; the LM
head is the target's, restricted to a *draft vocabulary* (the most frequent tokens of the training
answers) because on a 135M model the full head is ~20 % of the weights and would dominate the draft
cost. The target still verifies over the full vocabulary, so the restriction cannot change output.

An adapter file is safetensors with the adapter's weights, the draft vocabulary and metadata naming
the model it was trained for (shape and a fingerprint of its embedding), checked on load.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from joey.errors import ModelFormatError
from joey.models.config import ModelConfig
from joey.models.draft_files import find_shipped, load_checked, read_meta, save_draft_file
from joey.models.kv_cache import KVCache
from joey.models.llama import MLP, Attention, LlamaModel, RMSNorm, RowSpan

FORMAT = "joey-kangaroo-adapter/1"


class KangarooAdapter(nn.Module):
    """input RMSNorm → attention with a residual → final RMSNorm (the head is applied by the caller)."""

    def __init__(self, cfg: ModelConfig, exit_layer: int, vocab: torch.Tensor, mlp: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.exit_layer = exit_layer
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        # Optional: a full decoder layer instead of the paper's attention-only block (more capacity)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if mlp else None
        self.mlp = MLP(cfg) if mlp else None
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.register_buffer("vocab", vocab.to(torch.long))  # [draft_vocab] target token ids

    @classmethod
    def initialized_from(
        cls, model: LlamaModel, exit_layer: int, vocab: torch.Tensor, mlp: bool = False
    ) -> KangarooAdapter:
        """Start from the target's own next layer (its attention and input norm) and final norm:
        a far better starting point than random weights for a network that must imitate the rest."""
        adapter = cls(model.cfg, exit_layer, vocab, mlp)
        layer = model.model.layers[min(exit_layer, model.cfg.num_layers - 1)]
        adapter.input_layernorm.load_state_dict(layer.input_layernorm.state_dict())
        adapter.self_attn.load_state_dict(layer.self_attn.state_dict())
        if adapter.mlp is not None:
            adapter.post_attention_layernorm.load_state_dict(layer.post_attention_layernorm.state_dict())
            adapter.mlp.load_state_dict(layer.mlp.state_dict())
        adapter.norm.load_state_dict(model.model.norm.state_dict())
        return adapter.to(model.device, model.dtype)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        p = self.norm.weight
        return KVCache(1, batch, self.cfg.num_kv_heads, max_len, self.cfg.head_dim, dtype=p.dtype, device=p.device)

    def forward(
        self,
        hidden: torch.Tensor,  # [B*T, hidden]: the target's hidden states after layer ``exit_layer``
        shape: tuple[int, int],  # (B, T)
        cos: torch.Tensor,  # [B*T, 1, head_dim] from LlamaModel.rope(positions)
        sin: torch.Tensor,
        cache: KVCache,  # the adapter's own one-layer cache
        slots: int | torch.Tensor,
        kv_len: int,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """→ normalised states [B*T, hidden], ready for the (draft-vocabulary) LM head."""
        x = self.input_layernorm(hidden)
        return self._finish(hidden, self.self_attn(x, shape, cos, sin, cache.k[0], cache.v[0], slots, kv_len, mask))

    def forward_rows(
        self,
        hidden: torch.Tensor,  # [N, hidden]: several rows' layer-l states, packed row after row
        cos: torch.Tensor,  # [N, 1, head_dim]
        sin: torch.Tensor,
        rows: Sequence[RowSpan],  # each row's share of the states and its own one-layer adapter cache
    ) -> torch.Tensor:
        """``forward`` for rows that each keep their own cache (one drafter per row): the dense
        parts run once on all packed states, attention per row → normalised states [N, hidden]."""
        return self._finish(hidden, self.self_attn.forward_rows(self.input_layernorm(hidden), cos, sin, rows, 0))

    def _finish(self, hidden: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The residual, the optional MLP and the final norm after attention's output ``attn``."""
        h = hidden + attn
        if self.mlp is not None:
            h = h + self.mlp(self.post_attention_layernorm(h))
        return self.norm(h)


def save_adapter(adapter: KangarooAdapter, model: LlamaModel, path: str | Path, extra: dict | None = None) -> None:
    meta = {"format": FORMAT, "exit_layer": adapter.exit_layer, "mlp": adapter.mlp is not None, **(extra or {})}
    save_draft_file(adapter.state_dict(), adapter.vocab, model, path, meta)


def read_adapter_meta(path: str | Path) -> dict:
    return read_meta(path, FORMAT, "Kangaroo adapter")


def load_adapter(path: str | Path, model: LlamaModel) -> KangarooAdapter:
    """Read an adapter file and check that it belongs to ``model``; ModelFormatError otherwise."""
    meta, state = load_checked(path, model, FORMAT, "Kangaroo adapter")
    exit_layer = meta.get("exit_layer")
    if not isinstance(exit_layer, int) or not 1 <= exit_layer < model.cfg.num_layers:
        raise ModelFormatError(f"{path}: invalid exit layer {exit_layer!r}")
    adapter = KangarooAdapter(model.cfg, exit_layer, state["vocab"], mlp=bool(meta.get("mlp", False)))
    try:
        adapter.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelFormatError(f"{path}: adapter weights do not fit this model ({str(exc).splitlines()[0][:120]})")
    return adapter.to(model.device, model.dtype).eval()


def find_adapter(model: LlamaModel, folder: Path | None = None) -> Path | None:
    """The adapter shipped inside joey (``joey/adapters/*.safetensors``) that matches ``model``, if any."""
    folder = folder or Path(__file__).resolve().parent.parent / "adapters"
    return find_shipped(model, folder, FORMAT, "Kangaroo adapter")
