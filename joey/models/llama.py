"""A compact Llama-family decoder (llama, mistral, smollm, qwen2) that joey controls end to end.

Compared with the transformers implementation it exposes what speculative decoding needs:
explicit position ids, KV slots named by the caller (so rows of a batch and nodes of a tree can
sit anywhere in the cache), an arbitrary boolean attention mask over cache slots, and running a
*range* of layers on hidden states (Kangaroo drafts with layers [0, l) and verifies with [l, L)).
Weights are read from Hugging Face names; nothing in transformers is patched or subclassed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from joey.batching import Packing
from joey.errors import UnsupportedArchitectureError
from joey.models.kv_cache import KVCache

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a decoder, read from a Hugging Face config.json."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        archs = hf.get("architectures") or []
        model_type = hf.get("model_type", "")
        arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None and model_type in SUPPORTED_ARCHITECTURES.values():
            arch = model_type
        if arch is None:
            name = ", ".join(archs) or model_type or "unknown"
            raise UnsupportedArchitectureError(
                f"unsupported architecture '{name}'; joey supports {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise UnsupportedArchitectureError(f"unsupported RoPE scaling '{rope_type}'")
        if hf.get("sliding_window") and hf.get("use_sliding_window", arch == "mistral"):
            raise UnsupportedArchitectureError("sliding-window attention is not supported")
        num_heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        return cls(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hidden // num_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", arch == "qwen2")),
        )


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's blocked layout of an fp32 [out, in] weight, for ``packed_linear``."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [N, in] @ W.T (+ bias) with a weight from ``pack_weight``."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class Linear(nn.Linear):
    """nn.Linear that can pre-pack its weight for oneDNN on CPU.

    MKL's fp32 GEMM for a handful of rows (one decode token, a short draft to verify) reads the
    weight at ~8 GB/s on a 2-core AVX2 machine and costs ~4x more for 4 rows than for 1; oneDNN
    with a pre-packed (blocked) weight reads it at ~13 GB/s, and 4 rows cost ~1.2x one row
    (benchmarks/ar_speed.py). That ratio is what makes verifying several tokens at once pay off.
    """

    _packed: torch.Tensor | None = None

    def prepack(self) -> None:
        self._packed = pack_weight(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None and not torch.is_grad_enabled():
            return packed_linear(x, self._packed, self.bias)
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused op: per-op overhead matters at decode time on CPU
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Normalise in fp32 like the reference implementation, so bf16 runs match it.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_tables(cfg: ModelConfig, max_len: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables, [max_len, head_dim], in fp32."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
    t = torch.arange(max_len, dtype=torch.float64)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().float().to(device), emb.sin().float().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [N, heads, head_dim]; cos/sin: [N, 1, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = Linear(h, cfg.num_heads * d, bias=cfg.attention_bias)
        self.k_proj = Linear(h, cfg.num_kv_heads * d, bias=cfg.attention_bias)
        self.v_proj = Linear(h, cfg.num_kv_heads * d, bias=cfg.attention_bias)
        self.o_proj = Linear(cfg.num_heads * d, h, bias=False)
        self._qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def prepack(self) -> None:
        """Fuse q/k/v into one packed GEMM: one larger matrix streams faster than three small ones."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        bias = torch.cat([p.bias.detach() for p in projs]) if self.cfg.attention_bias else None
        self._qkv = (pack_weight(torch.cat([p.weight for p in projs])), bias)
        self.o_proj.prepack()

    def project_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, hidden] → [N, heads + 2 * kv_heads, head_dim]: queries, then keys, then values."""
        if self._qkv is not None and not torch.is_grad_enabled():
            qkv = packed_linear(x, *self._qkv)
        else:
            qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        return qkv.view(x.shape[0], -1, self.cfg.head_dim)

    def forward(
        self,
        x: torch.Tensor,  # [B*T, hidden] (2-D: see run_layers)
        shape: tuple[int, int],  # (B, T)
        cos: torch.Tensor,  # [B*T, 1, head_dim]
        sin: torch.Tensor,  # [B*T, 1, head_dim]
        k_cache: torch.Tensor,  # [B, kv_heads, max_len, head_dim]
        v_cache: torch.Tensor,  # [B, kv_heads, max_len, head_dim]
        slots: int | torch.Tensor,  # first slot (all rows alike) or [B, T] slot of each token
        kv_len: int,  # attend to slots [0, kv_len)
        mask: torch.Tensor | None,  # [B, 1, T, kv_len] bool, True = may attend; None = causal
        packing: Packing | None = None,  # x holds packed ragged rows (then ``shape`` is the padded grid)
    ) -> torch.Tensor:
        """Write this forward's keys/values into their cache slots, then attend → [tokens, hidden]."""
        cfg = self.cfg
        b, t = shape
        nh, nkv = cfg.num_heads, cfg.num_kv_heads
        qkv = self.project_qkv(x)
        qk = apply_rope(qkv[:, : nh + nkv], cos, sin)  # queries and keys rotated in one go
        if packing is not None:
            write_kv(k_cache, v_cache, qk[:, nh:], qkv[:, nh + nkv :], shape, packing.slots, packing.rows)
            q_rows = torch.cat([qk[:, :nh], qk.new_zeros(1, nh, cfg.head_dim)])[packing.to_grid]
        else:
            write_kv(k_cache, v_cache, qk[:, nh:], qkv[:, nh + nkv :], shape, slots)
            q_rows = qk[:, :nh]
        q = q_rows.reshape(b, t, nh, cfg.head_dim).transpose(1, 2)
        keys, values = k_cache[:, :, :kv_len], v_cache[:, :, :kv_len]
        gqa = cfg.num_heads != cfg.num_kv_heads
        if mask is None:
            # Causal with the queries at the end of the key range: only a prefill without past
            # (t == kv_len) or a single query, which may see every key, comes here.
            out = F.scaled_dot_product_attention(q, keys, values, is_causal=t > 1, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)
        out = out.transpose(1, 2).reshape(b * t, cfg.num_heads * cfg.head_dim)
        if packing is not None:
            out = out[packing.from_grid]  # back to the packed tokens: the dense layers skip the padding
        return self.o_proj(out)


def write_kv(
    k_cache: torch.Tensor,  # [B, kv_heads, max_len, head_dim]
    v_cache: torch.Tensor,
    k: torch.Tensor,  # [N, kv_heads, head_dim], one key per new token
    v: torch.Tensor,
    shape: tuple[int, int],  # (B, T): the tokens' grid when they are not packed
    slots: int | torch.Tensor,  # first slot for every row of the grid, or the slot of each token
    rows: torch.Tensor | None = None,  # [N] row of each token (packed input); None = grid order
) -> None:
    """Store new keys/values: a contiguous slice when all rows write from the same slot, else a
    scatter to (row, slot) per token."""
    b, t = shape
    if isinstance(slots, int):
        k_cache[:, :, slots : slots + t] = k.view(b, t, *k.shape[1:]).transpose(1, 2)
        v_cache[:, :, slots : slots + t] = v.view(b, t, *v.shape[1:]).transpose(1, 2)
        return
    if rows is None:
        rows = torch.arange(b, device=k.device).repeat_interleave(t)
    slots = slots.reshape(-1)
    k_cache[rows, :, slots] = k
    v_cache[rows, :, slots] = v


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self._gate_up: torch.Tensor | None = None

    def prepack(self) -> None:
        """Fuse gate and up projections into one packed GEMM."""
        self._gate_up = pack_weight(torch.cat([self.gate_proj.weight, self.up_proj.weight]))
        self.down_proj.prepack()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._gate_up is not None and not torch.is_grad_enabled():
            gate, up = packed_linear(x, self._gate_up, None).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Backbone(nn.Module):
    """Named like transformers' ``model`` submodule so state dicts load without renaming."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaModel(nn.Module):
    """Decoder with explicit positions, caller-chosen KV slots, masks and layer ranges."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    def prepack(self) -> bool:
        """Pre-pack every linear layer for oneDNN (fp32 CPU only); returns whether it did."""
        w = self.lm_head.weight
        if w.device.type != "cpu" or w.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
            return False
        for layer in self.model.layers:
            layer.self_attn.prepack()
            layer.mlp.prepack()
        self.lm_head.prepack()
        return True

    # -- building blocks -------------------------------------------------------------------------
    def new_cache(self, batch: int, max_len: int) -> KVCache:
        p = self.lm_head.weight
        return KVCache(
            self.cfg.num_layers, batch, self.cfg.num_kv_heads, max_len, self.cfg.head_dim,
            dtype=p.dtype, device=p.device,
        )

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for positions [B, T] → [B*T, 1, head_dim] each, in the model's dtype."""
        # a margin past the context: draft and padding tokens of a step may sit beyond the last
        # committable position (they are verified and dropped, never committed)
        need = self.cfg.max_position_embeddings + 256
        if self._rope is None or self._rope[0].device != positions.device:
            self._rope = rope_tables(self.cfg, need, positions.device)
        cos, sin = self._rope
        dtype = self.lm_head.weight.dtype
        flat = positions.reshape(-1)
        return cos[flat].unsqueeze(1).to(dtype), sin[flat].unsqueeze(1).to(dtype)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] → hidden [B, T, hidden]."""
        return self.model.embed_tokens(tokens)

    def run_layers(
        self,
        hidden: torch.Tensor,  # [B, T, hidden]
        positions: torch.Tensor,  # [B, T] RoPE positions
        cache: KVCache,
        slots: int | torch.Tensor,  # int: contiguous slots from here for every row; else [B, T]
        kv_len: int,  # attend to cache slots [0, kv_len) (after this forward's writes)
        mask: torch.Tensor | None = None,  # [B, 1, T, kv_len] bool
        start: int = 0,
        end: int | None = None,
    ) -> torch.Tensor:
        """Run layers [start, end), writing their K/V into ``slots``; returns the hidden state after
        them (no final norm). Lengths in the cache are the caller's to advance or roll back."""
        b, t, h = hidden.shape
        x = self._layers(hidden.reshape(b * t, h), (b, t), positions, cache, slots, kv_len, mask, start, end, None)
        return x.view(b, t, h)

    def _layers(
        self,
        x: torch.Tensor,  # [tokens, hidden]: B*T in grid order, or packed ragged rows
        shape: tuple[int, int],
        positions: torch.Tensor,  # one position per token of x (any shape with that many elements)
        cache: KVCache,
        slots: int | torch.Tensor,
        kv_len: int,
        mask: torch.Tensor | None,
        start: int,
        end: int | None,
        packing: Packing | None,
    ) -> torch.Tensor:
        # Dense layers see 2-D [tokens, hidden] activations (what GEMM kernels and EMS-SD's packed
        # batches want); attention reshapes per row.
        end = self.cfg.num_layers if end is None else end
        cos, sin = self.rope(positions)
        for i in range(start, end):
            layer = self.model.layers[i]
            x = x + layer.self_attn(
                layer.input_layernorm(x), shape, cos, sin, cache.k[i], cache.v[i], slots, kv_len, mask, packing
            )
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return x

    def forward_packed(
        self,
        inputs: torch.Tensor,  # [N] the rows' new tokens, concatenated; or their hidden states [N, hidden]
        cache: KVCache,
        packing: Packing,  # from joey.batching.pack
        kv_len: int,
        mask: torch.Tensor,  # [B, 1, T, kv_len] over the padded grid (joey.batching.step_mask)
        start: int = 0,  # first layer to run (hidden-state inputs come from layer ``start``)
        head: bool = True,
    ) -> torch.Tensor:
        """Ragged rows without padding in the dense layers (EMS-SD) → logits [N, vocab], or with
        ``head=False`` the final-norm features [N, hidden] (``self.head`` makes the logits)."""
        x = self.embed(inputs) if inputs.dtype == torch.long else inputs
        x = self._layers(x, packing.grid, packing.positions, cache, packing.slots, kv_len, mask, start, None, packing)
        return self.logits(x) if head else self.model.norm(x)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """LM head on final-norm features: [..., hidden] → [..., vocab] (fp32)."""
        return self.lm_head(features).float()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head: [..., hidden] → [..., vocab] (fp32)."""
        return self.head(self.model.norm(hidden))

    def forward(
        self,
        tokens: torch.Tensor,  # [B, T]
        positions: torch.Tensor,  # [B, T]
        cache: KVCache,
        slots: int | torch.Tensor,
        kv_len: int,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens → logits [B, T, vocab], writing every layer's K/V into ``slots``."""
        return self.logits(self.run_layers(self.embed(tokens), positions, cache, slots, kv_len, mask))

    def forward_from(
        self,
        hidden: torch.Tensor,  # [B, T, hidden]: states after layer ``start`` (Kangaroo's draft pass)
        positions: torch.Tensor,  # [B, T]
        cache: KVCache,
        slots: int | torch.Tensor,
        kv_len: int,
        mask: torch.Tensor | None,
        start: int,
        head: bool = True,
    ) -> torch.Tensor:
        """Layers [start, L) + head → logits [B, T, vocab] (``head=False``: final-norm features
        [B, T, hidden]); layers below ``start`` are not touched."""
        x = self.run_layers(hidden, positions, cache, slots, kv_len, mask, start=start)
        return self.logits(x) if head else self.model.norm(x)


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


