"""A compact Llama-family decoder (llama, mistral, smollm, qwen2) that joey controls end to end.

Compared with the transformers implementation it exposes what speculative decoding needs:
explicit position ids, KV slots named by the caller (so rows of a batch and nodes of a tree can
sit anywhere in the cache), an arbitrary boolean attention mask over cache slots, and running a
*range* of layers on hidden states (Kangaroo drafts with layers [0, l) and verifies with [l, L)).
Weights are read from Hugging Face names; nothing in transformers is patched or subclassed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from joey.batching import Packing
from joey.errors import UnsupportedArchitectureError
from joey.models.kv_cache import KVCache
from joey.models.weight_formats import FORMATS, LinearKernel, QuantizedWeight, concat_rows, make_kernel

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


class Linear(nn.Linear):
    """nn.Linear whose inference path runs a ``LinearKernel`` (joey.models.weight_formats) when one is set.

    Training and autograd always use the float ``weight``; a kernel is what decoding runs: fp32 or
    bf16 weights pre-packed for oneDNN, or int8/int4 codes. MKL's fp32 GEMM for a handful of rows
    costs ~4x more for 4 rows than for 1 on a 2-core CPU; oneDNN with a pre-packed weight ~1.2x
    (benchmarks/ar_speed.py): that flatness is what makes verifying several tokens at once pay off.
    """

    kernel: LinearKernel | None = None

    def prepack(self) -> None:
        """A float kernel in the weight's own dtype (fp32 or bf16)."""
        self.kernel = make_kernel(float_format(self.weight.dtype), self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None and not torch.is_grad_enabled():
            return run_kernel(self.kernel, x)
        return F.linear(x, self.weight, self.bias)


def run_kernel(kernel: LinearKernel, x: torch.Tensor) -> torch.Tensor:
    """A kernel on [..., in] inputs (kernels take 2-D ones)."""
    if x.dim() == 2:
        return kernel(x)
    return kernel(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)


def float_format(dtype: torch.dtype) -> str:
    """The float kernel format for weights of ``dtype`` (bf16 stays bf16, the rest run in fp32)."""
    return "bf16" if dtype == torch.bfloat16 else "fp32"


WeightSource = torch.Tensor | QuantizedWeight  # a float weight or a GGUF's own codes


def fuse(fmt: str, linears: list[Linear], sources: list[WeightSource] | None = None) -> LinearKernel | None:
    """One kernel for several linears stacked along their outputs (q/k/v, gate/up): one larger GEMM
    streams faster than several small ones. None when the sources cannot share one kernel (a GGUF
    may store q and k in 4 bits and v in 6); each linear then gets its own."""
    sources = sources or [lin.weight for lin in linears]
    for lin in linears:
        lin.kernel = None  # a fused kernel replaces theirs (and an earlier format's)
    biases = [lin.bias for lin in linears]
    bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])  # type: ignore[union-attr]
    if all(isinstance(w, torch.Tensor) for w in sources):
        return make_kernel(fmt, torch.cat([w.detach() for w in sources]), bias)  # type: ignore[union-attr]
    try:
        return make_kernel(fmt, concat_rows(sources), bias)  # type: ignore[arg-type]
    except (TypeError, ValueError, AttributeError):
        for lin, w in zip(linears, sources):
            lin.kernel = make_kernel(fmt, w, lin.bias)
        return None


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
        self._qkv: LinearKernel | None = None

    def set_weights(self, fmt: str, sources: list[WeightSource] | None = None) -> None:
        """Kernels in format ``fmt``; ``sources``: q, k, v, o weights (default: the float ones)."""
        projs = [self.q_proj, self.k_proj, self.v_proj]
        self._qkv = fuse(fmt, projs, sources[:3] if sources else None)
        self.o_proj.kernel = make_kernel(fmt, sources[3] if sources else self.o_proj.weight)

    def prepack(self) -> None:
        self.set_weights(float_format(self.q_proj.weight.dtype))

    def project_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, hidden] → [N, heads + 2 * kv_heads, head_dim]: queries, then keys, then values."""
        if self._qkv is not None and not torch.is_grad_enabled():
            qkv = self._qkv(x)
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
        nh, nkv = self.cfg.num_heads, self.cfg.num_kv_heads
        qkv = self.project_qkv(x)
        qk = apply_rope(qkv[:, : nh + nkv], cos, sin)  # queries and keys rotated in one go
        out = self._attend(qk, qkv[:, nh + nkv :], shape, k_cache, v_cache, slots, kv_len, mask, packing)
        return self.o_proj(out)

    def forward_rows(
        self,
        x: torch.Tensor,  # [N, hidden]: the rows' tokens packed, row after row
        cos: torch.Tensor,  # [N, 1, head_dim]
        sin: torch.Tensor,  # [N, 1, head_dim]
        rows: Sequence[RowSpan],  # each row's share of x and its own cache
        layer: int,  # which layer of the rows' caches this attention is
    ) -> torch.Tensor:
        """Like ``forward`` for rows that each keep their own batch-1 cache (a drafter per row):
        the projections run once on all packed tokens, RoPE, the cache write and attention per row
        against that row's cache → [N, hidden]."""
        nh, nkv = self.cfg.num_heads, self.cfg.num_kv_heads
        qkv = self.project_qkv(x)
        qk = apply_rope(qkv[:, : nh + nkv], cos, sin)
        outs = []
        start = 0
        for row in rows:
            end = start + row.tokens
            outs.append(self._attend(qk[start:end], qkv[start:end, nh + nkv :], (1, row.tokens),
                                     row.cache.k[layer], row.cache.v[layer], row.slots, row.kv_len, row.mask))
            start = end
        return self.o_proj(outs[0] if len(outs) == 1 else torch.cat(outs))

    def _attend(
        self,
        qk: torch.Tensor,  # [tokens, heads + kv_heads, head_dim]: rotated queries, then keys
        v: torch.Tensor,  # [tokens, kv_heads, head_dim]
        shape: tuple[int, int],
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slots: int | torch.Tensor,
        kv_len: int,
        mask: torch.Tensor | None,
        packing: Packing | None = None,
    ) -> torch.Tensor:
        """Store the keys/values, attend → [tokens, heads * head_dim] (before ``o_proj``);
        arguments as in ``forward``."""
        cfg = self.cfg
        b, t = shape
        nh = cfg.num_heads
        if packing is not None:
            write_kv(k_cache, v_cache, qk[:, nh:], v, shape, packing.slots, packing.rows)
            q_rows = torch.cat([qk[:, :nh], qk.new_zeros(1, nh, cfg.head_dim)])[packing.to_grid]
        else:
            write_kv(k_cache, v_cache, qk[:, nh:], v, shape, slots)
            q_rows = qk[:, :nh]
        q = q_rows.reshape(b, t, nh, cfg.head_dim).transpose(1, 2).to(k_cache.dtype)
        keys, values = k_cache[:, :, :kv_len], v_cache[:, :, :kv_len]
        gqa = cfg.num_heads != cfg.num_kv_heads
        if mask is None:
            # Causal with the queries at the end of the key range: only a prefill without past
            # (t == kv_len) or a single query, which may see every key, comes here.
            out = F.scaled_dot_product_attention(q, keys, values, is_causal=t > 1, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)
        out = out.transpose(1, 2).reshape(b * t, cfg.num_heads * cfg.head_dim).to(qk.dtype)
        if packing is not None:
            out = out[packing.from_grid]  # back to the packed tokens: the dense layers skip the padding
        return out


@dataclass(frozen=True)
class RowSpan:
    """One row of a packed forward whose attention runs against the row's own batch-1 cache
    (drafters keep a cache per row, so rows join and leave a batch freely); the row's tokens are
    ``tokens`` consecutive rows of the packed input."""

    tokens: int
    cache: KVCache  # batch 1
    slots: int | torch.Tensor  # first slot of a contiguous run, or [1, tokens] slot of each token
    kv_len: int  # attend to slots [0, kv_len) (after this forward's writes)
    mask: torch.Tensor | None  # [1, 1, tokens, kv_len] bool; None = causal


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
    k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)  # a no-op unless the cache is float64 (cache_dtype)
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
        self._gate_up: LinearKernel | None = None

    def set_weights(self, fmt: str, sources: list[WeightSource] | None = None) -> None:
        """Kernels in format ``fmt``; ``sources``: gate, up, down weights (default: the float ones)."""
        self._gate_up = fuse(fmt, [self.gate_proj, self.up_proj], sources[:2] if sources else None)
        self.down_proj.kernel = make_kernel(fmt, sources[2] if sources else self.down_proj.weight)

    def prepack(self) -> None:
        self.set_weights(float_format(self.gate_proj.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._gate_up is not None and not torch.is_grad_enabled():
            gate, up = self._gate_up(x).chunk(2, dim=-1)
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
        self._format: str | None = None  # set_weights' format; None = plain float weights

    def prepack(self) -> bool:
        """Pre-pack every linear layer for oneDNN (fp32 CPU only); returns whether it did."""
        w = self.lm_head.weight
        if w.device.type != "cpu" or w.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
            return False
        self.set_weights("fp32")
        return True

    def set_weights(self, fmt: str, native: dict[str, QuantizedWeight] | None = None, keep_float: bool = True) -> None:
        """Run every linear layer in weight format ``fmt`` (joey.models.weight_formats.FORMATS), CPU
        only, or with ``fmt="native"`` each layer in the format of its stored blocks (fp32 where none).

        ``native``: quantized weights by Hugging Face name (a GGUF's own blocks). ``keep_float=False``
        frees the decoder layers' float weights (a model can then not change format again); the LM
        head keeps its float weight, which drafters slice for their draft vocabularies.
        """
        native = native or {}
        bits = {"int4": 4, "int8": 8}.get(fmt)

        def src(name: str, lin: Linear) -> WeightSource:
            # "native": every stored block at its own bits; int4/int8: stored codes of exactly that
            # width, the rest quantized from the float copy; float formats: the float copy, which
            # is the exact dequantization of any stored blocks
            q = native.get(name)
            if q is not None and (fmt == "native" or q.bits == bits):
                return q
            return lin.weight

        for i, layer in enumerate(self.model.layers):
            a, m = layer.self_attn, layer.mlp
            p = f"model.layers.{i}"
            a.set_weights(fmt, [src(f"{p}.self_attn.{n}.weight", getattr(a, n)) for n in ("q_proj", "k_proj",
                                                                                           "v_proj", "o_proj")])
            m.set_weights(fmt, [src(f"{p}.mlp.{n}.weight", getattr(m, n)) for n in ("gate_proj", "up_proj",
                                                                                     "down_proj")])
        self.lm_head.kernel = make_kernel(fmt, src("lm_head.weight", self.lm_head))
        self._format = "+".join(sorted({k.format for k in self.kernels()}, key=lambda f: -FORMATS.index(f)))
        if not keep_float:
            for layer in self.model.layers:
                for lin in (*layer.self_attn.children(), *layer.mlp.children()):
                    if isinstance(lin, Linear):
                        lin.weight = None  # type: ignore[assignment]

    @property
    def weight_format(self) -> str:
        """fp32, bf16, int8 or int4 (what set_weights chose; "int4+int8" for a mix, as a GGUF that
        keeps its LM head in 8 bits runs natively), or the float dtype of plain weights."""
        return self._format or str(self.lm_head.weight.dtype).replace("torch.", "").replace("float32", "fp32")

    def kernels(self) -> list[LinearKernel]:
        """Every kernel a decoding step runs (fused ones count once)."""
        out: list[LinearKernel] = []
        for layer in self.model.layers:
            a, m = layer.self_attn, layer.mlp
            fused = [k for k in (a._qkv, m._gate_up) if k is not None]
            out += fused + [lin.kernel for lin in (*a.children(), *m.children())
                            if isinstance(lin, Linear) and lin.kernel is not None]
        if self.lm_head.kernel is not None:
            out.append(self.lm_head.kernel)
        return out

    def weight_bytes(self) -> int:
        """Bytes of linear-layer weights one decoding step reads (the kernels', else the float weights')."""
        kernels = self.kernels()
        if kernels:
            return sum(k.nbytes for k in kernels)
        w = self.lm_head.weight
        per = w.element_size()
        return sum(lin.weight.numel() * per for lin in self.modules() if isinstance(lin, Linear))

    # -- building blocks -------------------------------------------------------------------------
    @property
    def cache_dtype(self) -> torch.dtype:
        """The KV cache's dtype, which attention computes in: float64 when the linear layers take
        bf16 inputs. Attention over a different number of queries or keys sums in a different
        order; in fp32 that changes results by ~1e-7, and a bf16 rounding downstream turns that
        into a different logit now and then, so verifying k tokens at once would not always
        reproduce decoding them one by one. In float64 the differences vanish when the result is
        rounded back to fp32, and greedy outputs stay identical (tests/test_weight_formats.py)."""
        if self._format is not None and self._format != "fp32":
            return torch.float64
        return self.lm_head.weight.dtype

    def new_cache(self, batch: int, max_len: int, layers: int | None = None) -> KVCache:
        """An empty KV cache for ``layers`` (default: all) layers."""
        return KVCache(
            self.cfg.num_layers if layers is None else layers, batch, self.cfg.num_kv_heads, max_len,
            self.cfg.head_dim, dtype=self.cache_dtype, device=self.lm_head.weight.device,
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

        def attend(i: int, attn: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
            return attn(x, (b, t), cos, sin, cache.k[i], cache.v[i], slots, kv_len, mask)

        return self._layers(hidden.reshape(b * t, h), positions, attend, start, end).view(b, t, h)

    def run_layers_rows(
        self,
        hidden: torch.Tensor,  # [N, hidden]: the rows' tokens packed, row after row, no padding
        positions: torch.Tensor,  # [N] RoPE position of each token
        rows: Sequence[RowSpan],  # each row's share of the tokens and its own batch-1 cache
        start: int = 0,
        end: int | None = None,
    ) -> torch.Tensor:
        """Layers [start, end) for rows that each keep their own cache (one drafter per row): norms,
        projections and MLPs run once on all packed tokens, RoPE, the cache writes and attention
        per row. Returns the packed states after the layers [N, hidden] (no final norm). A row's
        result is what ``run_layers`` gives for it alone, bit for bit, when the linear layers run
        row-invariant kernels (``prepack`` / ``set_weights``)."""

        def attend(i: int, attn: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
            return attn.forward_rows(x, cos, sin, rows, i)

        return self._layers(hidden, positions, attend, start, end)

    def _layers(
        self,
        x: torch.Tensor,  # [tokens, hidden]: B*T in grid order, or packed ragged rows
        positions: torch.Tensor,  # one position per token of x (any shape with that many elements)
        attend: Callable[[int, Attention, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
        start: int,
        end: int | None,
    ) -> torch.Tensor:
        """Layers [start, end) on x; ``attend(layer index, attention, normed x, cos, sin)`` says where
        each layer's attention reads and writes its keys and values."""
        # Dense layers see 2-D [tokens, hidden] activations (what GEMM kernels and EMS-SD's packed
        # batches want); attention reshapes per row.
        end = self.cfg.num_layers if end is None else end
        cos, sin = self.rope(positions)
        for i in range(start, end):
            layer = self.model.layers[i]
            x = x + attend(i, layer.self_attn, layer.input_layernorm(x), cos, sin)
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

        def attend(i: int, attn: Attention, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
            return attn(h, packing.grid, cos, sin, cache.k[i], cache.v[i], packing.slots, kv_len, mask, packing)

        x = self._layers(x, packing.positions, attend, start, None)
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


