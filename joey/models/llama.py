"""A compact decoder for the Llama family and its relatives (llama incl. 3.x, mistral, smollm, qwen2,
qwen3, phi3, gemma2, gemma3) that joey controls end to end. The families differ only in
``ModelConfig``'s data (``joey.models.config``: RoPE variant, sliding windows, q/k norms, norm
placement, activation, scales, soft-caps); there is one set of modules for all of them.

Compared with the transformers implementation it exposes what speculative decoding needs:
explicit position ids, KV slots named by the caller (so rows of a batch and nodes of a tree can
sit anywhere in the cache), an arbitrary boolean attention mask over cache slots, and running a
*range* of layers on hidden states (Kangaroo drafts with layers [0, l) and verifies with [l, L)).
Weights are read from Hugging Face names; nothing in transformers is patched or subclassed.

The rule: every path gives the same bits. A row's result must not depend on how it was computed:
not on the other rows of the batch, the tree its tokens form or the cache slots they sit in,
whether the step was packed, padded or run row by row, nor on which entry point below ran it. That
is what lets verifying k tokens reproduce k decoding steps, and a row of a batch reproduce the row
alone. What the code does for it, at inference (autograd, i.e. training, keeps PyTorch's ops):

- joey's C kernels (``group_kernel``: RMSNorm, RoPE with the cache writes, silu(gate) * up,
  attention, and whole layers in ``decode_layer``) run on every path wherever they run at all (fp32
  activations on a CPU that has them). ``rope_store`` gives ``apply_rope``'s bits and ``decode_layer``
  calls the same C functions in the same order as the modules (``layer_plans``); the C silu differs
  from ``F.silu``, so a model never mixes the two.
- Attention: joey's C attention computes each query on its own over exactly the keys it may see, so
  neither the number of queries, rows or keys in the call nor their slots change a result. Where it
  does not serve a call (SDPA then does, or Gemma 2's soft-capped attention, whose sums depend on the
  shape), a model whose linears run a bf16 or low-bit format keeps its cache and attention in float64
  (``cache_dtype``), and the differences vanish when the result is rounded back to fp32.
- Linear layers: joey's low-bit kernel, PyTorch's int4/int8 kernels and bf16 oneDNN (in blocks of
  ``weight_formats.BF16_ROWS`` rows) give a row the same bits however many rows share the call. fp32
  oneDNN (``prepack``) does not in general. Which kernels a model's linears run is set through
  ``model.kernel_setup`` (``joey.models.kernel_setup``: ``set_weights``, ``prepack``, ``use_kernels``).

So on a CPU a model whose linears all run those row-invariant kernels gives bitwise the same logits
on every path (tests/test_weight_formats.py, tests/test_gguf_kernels.py); an fp32 model agrees across
paths up to fp32 rounding (its greedy outputs are what the tests pin), and on a GPU (plain PyTorch
linears and SDPA in the model's dtype) nothing bitwise is promised.

Entry points, and who uses which:

- ``forward`` / ``forward_from``: grid forwards, [B, T] tokens (or the states after layer ``start``)
  → logits or final-norm features: a prefill of prompts of one length, a verification where every
  row feeds the same number of tokens, the padded lock-step baseline (``joey.target_runner``); a
  Kangaroo verification enters at its exit layer (``start``). ``forward`` is also the budget's cost
  measurement (``joey.budget.measure``).
- ``run_layers``: layers [start, end) on a grid, no final norm: the body of the two above, and
  distillation (``joey.training.distill``), which keeps the states after each exit layer.
- ``run_layers_rows``: packed rows that each attend against their own batch-1 cache (``RowSpan``;
  ``KVCache.row`` views of a batch's cache): prefills of prompts of different lengths and steps whose
  padded grid would be mostly padding (``joey.target_runner``), and drafters, which keep a cache per
  row: the SPS draft model (all layers) and Kangaroo (layers [0, l)).
- ``forward_packed``: ragged rows packed without padding in the dense layers, attention over the
  padded grid (EMS-SD verification, ``joey.batching.pack`` / ``step_mask``).
- ``head`` (final-norm features → logits) and ``logits`` (final norm + head): the LM head, run once
  over a whole step's rows (``joey.target_runner``, ``joey.continuous``) and by the SPS drafter.
- ``head_rows``: rows of the LM head's weight, which drafters slice for their draft vocabularies
  (and adapter/head training reads), also where only a GGUF's blocks are kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from joey.batching import Packing, causal_mask, window_mask
from joey.models import group_kernel
from joey.models.config import ModelConfig
from joey.models.kernel_setup import KernelSetup
from joey.models.kv_cache import KVCache
from joey.models.quantized import QuantizedWeight
from joey.models.rope import RopeConfig, rope_table
from joey.models.weight_formats import LinearKernel, concat_rows, make_kernel


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
            if not torch.is_grad_enabled() and self.weight.is_contiguous():
                y = group_kernel.rms_norm(x, self.weight, self.eps)  # joey's C kernel, where it runs
                if y is not None:
                    return y
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Normalise in fp32 like the reference implementation, so bf16 runs match it.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_tables(
    cfg: ModelConfig, max_len: int, device: torch.device | str, rope: RopeConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of ``rope`` (default: the model's global RoPE), [max_len, rotary_dim], fp32."""
    return rope_table(rope or cfg.rope, cfg.head_dim, max_len, device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [N, heads, head_dim]; cos/sin: [N, 1, rotary_dim]. Channels past ``rotary_dim`` (a
    partial rotary factor) pass through unrotated."""
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        return torch.cat([apply_rope(x[..., :rot], cos, sin), x[..., rot:]], dim=-1)
    half = rot // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    """Grouped-query attention over a KV cache; ``window``: the layer's sliding window (None = all
    earlier positions). Drafters' own attention blocks are built without one."""

    def __init__(self, cfg: ModelConfig, window: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.window = window
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = Linear(h, cfg.num_heads * d, bias=cfg.attention_bias)
        self.k_proj = Linear(h, cfg.num_kv_heads * d, bias=cfg.attention_bias)
        self.v_proj = Linear(h, cfg.num_kv_heads * d, bias=cfg.attention_bias)
        self.o_proj = Linear(cfg.num_heads * d, h, bias=False)
        if cfg.qk_norm:  # plain float modules: weight formats concern the linear layers only
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
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

    def rotate_qk(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Queries and keys of ``project_qkv``'s output, normed per head where the model does so,
        then rotated in one go → [N, heads + kv_heads, head_dim]."""
        nh, nkv = self.cfg.num_heads, self.cfg.num_kv_heads
        qk = qkv[:, : nh + nkv]
        if self.cfg.qk_norm:
            qk = torch.cat([self.q_norm(qk[:, :nh]), self.k_norm(qk[:, nh:])], dim=1)
        return apply_rope(qk, cos, sin)

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
        if not self.cfg.qk_norm and not torch.is_grad_enabled():
            # RoPE and the cache writes in one C call (the same bits as the ops below, without their
            # per-op overhead, which at decode time is most of what they cost)
            q = group_kernel.rope_store(qkv, cos, sin, k_cache, v_cache, packing.slots if packing else slots,
                                        shape[1], packing.rows if packing else None)
            if q is not None:
                out = self._attend(q, qkv[:, nh + nkv :], shape, k_cache, v_cache, slots, kv_len, mask, packing,
                                   stored=True)
                return self.o_proj(out)
        qk = self.rotate_qk(qkv, cos, sin)
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
        qk = self.rotate_qk(qkv, cos, sin)
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
        stored: bool = False,  # the keys/values are in the cache already (``qk`` holds only the queries)
    ) -> torch.Tensor:
        """Store the keys/values, attend → [tokens, heads * head_dim] (before ``o_proj``);
        arguments as in ``forward``."""
        cfg = self.cfg
        b, t = shape
        nh = cfg.num_heads
        if not stored:
            write_kv(k_cache, v_cache, qk[:, nh:], v, shape, *((packing.slots, packing.rows) if packing else (slots,)))
        # packed rows scatter into the [B, T] grid; with one token per row the two orders are the same
        gather = packing is not None and t > 1
        q_rows = qk[:, :nh][packing.to_grid] if gather else qk[:, :nh]
        if self.window is not None and kv_len > self.window:
            mask = window_mask(mask, self.window, t, kv_len, qk.device)
        fixed = None
        # the C kernel's cases; it has no backward, so training (adapters, heads) keeps SDPA
        if not cfg.attn_softcap and (mask is not None or t == 1 or t == kv_len) and not torch.is_grad_enabled():
            scale = cfg.attn_scale if cfg.attn_scale is not None else cfg.head_dim ** -0.5
            fixed = group_kernel.attention(q_rows.reshape(b, t, nh, cfg.head_dim), k_cache, v_cache, kv_len, mask,
                                           scale, *((packing.row_counts, packing.row_ends) if packing else ()))
        if fixed is not None:
            out = fixed.view(b * t, nh * cfg.head_dim).to(qk.dtype)
            return out[packing.from_grid] if gather else out
        q = q_rows.reshape(b, t, nh, cfg.head_dim).transpose(1, 2).to(k_cache.dtype)
        keys, values = k_cache[:, :, :kv_len], v_cache[:, :, :kv_len]
        gqa = cfg.num_heads != cfg.num_kv_heads
        if cfg.attn_softcap:
            out = softcapped_attention(q, keys, values, mask, cfg.attn_scale, cfg.attn_softcap)
        elif mask is None:
            # Causal with the queries at the end of the key range: only a prefill without past
            # (t == kv_len) or a single query, which may see every key, comes here.
            out = F.scaled_dot_product_attention(q, keys, values, is_causal=t > 1, enable_gqa=gqa, scale=cfg.attn_scale)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa, scale=cfg.attn_scale)
        out = out.transpose(1, 2).reshape(b * t, cfg.num_heads * cfg.head_dim).to(qk.dtype)
        if gather:
            out = out[packing.from_grid]  # back to the packed tokens: the dense layers skip the padding
        return out


def softcapped_attention(
    q: torch.Tensor,  # [B, heads, T, head_dim]
    keys: torch.Tensor,  # [B, kv_heads, kv_len, head_dim]
    values: torch.Tensor,  # [B, kv_heads, kv_len, head_dim]
    mask: torch.Tensor | None,  # [B, 1, T, kv_len] bool; None = causal with the queries last
    scale: float | None,
    cap: float,
) -> torch.Tensor:
    """Attention whose scores pass through cap * tanh(s / cap) before the softmax (Gemma 2's
    attention soft-capping), which the fused kernel cannot do → [B, heads, T, head_dim]."""
    t, kv_len = q.shape[2], keys.shape[2]
    if mask is None:
        mask = causal_mask([kv_len - t], t, kv_len, q.device)
    group = q.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    scores = q @ keys.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    scores = torch.tanh(scores / cap) * cap
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    return probs @ values


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
    """Gated MLP: down(act(gate(x)) * up(x)), SwiGLU or GeGLU as the config says."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.activation = cfg.activation
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
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        if self.activation == "silu" and not torch.is_grad_enabled():
            # joey's C kernel wherever it runs: the fused decoder layer (LlamaModel.layer_plans) uses
            # it too, and every path of a model must give the same bits
            mid = group_kernel.silu_mul(gate.reshape(-1, gate.shape[-1]), up.reshape(-1, up.shape[-1]))
            if mid is not None:
                return self.down_proj(mid.view(gate.shape))
        return self.down_proj(self.act(gate) * up)

    def act(self, gate: torch.Tensor) -> torch.Tensor:
        if self.activation == "silu":
            return F.silu(gate)
        return F.gelu(gate, approximate="tanh" if self.activation == "gelu_tanh" else "none")


class DecoderLayer(nn.Module):
    """Layer ``index`` of a decoder: its window and RoPE come from the config. Llama-style layers
    norm before attention and before the MLP (``post_attention_layernorm`` is the MLP's input norm);
    with ``sandwich_norms`` (Gemma 3) ``post_attention_layernorm`` norms the attention's output and
    the MLP gets a norm on each side."""

    def __init__(self, cfg: ModelConfig, index: int = 0) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, cfg.layer_window(index))
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rope = cfg.layer_rope(index)


class Backbone(nn.Module):
    """Named like transformers' ``model`` submodule so state dicts load without renaming."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
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
        self._rope: dict[RopeConfig, tuple[torch.Tensor, torch.Tensor]] = {}  # cos/sin tables
        self.kernel_setup = KernelSetup(self)  # which kernels the linear layers run, and what follows from it

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (the residual stream, norms and the KV cache unless said otherwise)."""
        return self.model.norm.weight.dtype

    def head_rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` [n] of the LM head's float weight → [n, hidden] in the model's dtype: what
        drafters slice for their draft vocabularies. Read from the stored blocks where the model keeps
        no float copy of the head."""
        w = self.lm_head.weight
        if w is not None:
            return w.detach()[index.to(w.device)]
        if self.kernel_setup.head_rows is None:
            raise RuntimeError("this model keeps neither a float LM head nor its blocks")
        return self.kernel_setup.head_rows(index).to(self.device, self.dtype)

    # -- the linear layers' kernels: ``kernel_setup`` sets them; what callers ask of them ---------
    @property
    def weight_format(self) -> str:
        return self.kernel_setup.weight_format

    def weight_bytes(self) -> int:
        return self.kernel_setup.weight_bytes()

    def layer_plans(self) -> list[group_kernel.LayerPlan | None]:
        # the forward paths ask here, so replacing this method switches the whole-layer C path off
        return self.kernel_setup.layer_plans()

    # -- building blocks -------------------------------------------------------------------------
    @property
    def cache_dtype(self) -> torch.dtype:
        """The KV cache's dtype, which attention computes in: float64 when the linear layers take
        bf16 inputs. Attention over a different number of queries or keys sums in a different
        order; in fp32 that changes results by ~1e-7, and a bf16 rounding downstream turns that
        into a different logit now and then, so verifying k tokens at once would not always
        reproduce decoding them one by one. In float64 the differences vanish when the result is
        rounded back to fp32, and greedy outputs stay identical (tests/test_weight_formats.py).
        Where joey's C attention serves every call (``group_kernel.attention``: every query on its
        own over exactly the keys it sees, so neither the number of queries nor their slots change a
        result) the cache stays fp32."""
        if self.kernel_setup.format not in (None, "fp32"):
            if (group_kernel.serves_attention(self.cfg.head_dim) and not self.cfg.attn_softcap
                    and self.device.type == "cpu"):
                return self.dtype
            return torch.float64
        return self.dtype

    @property
    def ragged_attention(self) -> bool:
        """Whether joey's C attention serves every attention call of a step (an fp32 cache on a CPU
        that runs the kernel, no soft-cap): one call then covers the rows of a ragged batch whatever
        their lengths, each scanning only its own slots (``Packing.row_ends``)."""
        return (self.device.type == "cpu" and self.dtype == torch.float32 and self.cache_dtype == torch.float32
                and not self.cfg.attn_softcap and group_kernel.serves_attention(self.cfg.head_dim))

    def new_cache(self, batch: int, max_len: int, layers: int | None = None) -> KVCache:
        """An empty KV cache for ``layers`` (default: all) layers."""
        return KVCache(
            self.cfg.num_layers if layers is None else layers, batch, self.cfg.num_kv_heads, max_len,
            self.cfg.head_dim, dtype=self.cache_dtype, device=self.device,
        )

    def rope(self, positions: torch.Tensor, rope: RopeConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of ``rope`` (default: the global one, which drafters' own attention uses) for
        positions [B, T] → [B*T, 1, rotary_dim] each, in the model's dtype."""
        rope = rope or self.cfg.rope
        # a margin past the context: draft and padding tokens of a step may sit beyond the last
        # committable position (they are verified and dropped, never committed)
        need = self.cfg.max_position_embeddings + 256
        table = self._rope.get(rope)
        if table is None or table[0].device != positions.device:
            table = self._rope[rope] = rope_tables(self.cfg, need, positions.device, rope)
        cos, sin = table
        dtype = self.dtype
        flat = positions.reshape(-1)
        return cos[flat].unsqueeze(1).to(dtype), sin[flat].unsqueeze(1).to(dtype)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] → hidden [B, T, hidden]."""
        x = self.model.embed_tokens(tokens)
        if x.dtype != self.dtype:  # a table kept in a GGUF's blocks gives fp32 rows
            x = x.to(self.dtype)
        if self.cfg.embed_scale != 1.0:
            # the scale rounded to the embedding's dtype first, as the reference implementation does
            x = x * torch.tensor(self.cfg.embed_scale, dtype=x.dtype)
        return x

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

        def whole(i: int, plan: group_kernel.LayerPlan, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
            group_kernel.decode_layer(plan, x, cos, sin, cache.k[i], cache.v[i], slots, (b, t), kv_len, mask)

        fused = whole if self._fusable(hidden, t, kv_len, mask) else None
        return self._layers(hidden.reshape(b * t, h), positions, attend, start, end, fused).view(b, t, h)

    def _fusable(self, x: torch.Tensor, t: int, kv_len: int, mask: torch.Tensor | None) -> bool:
        """Whether a forward may run its layers whole in C (``layer_plans``): inference in fp32 on a
        CPU, and an attention call the C kernel takes as ``Attention`` would give it (a mask over
        exactly the keys, or queries that are the last positions)."""
        return (not torch.is_grad_enabled() and x.dtype == torch.float32 and x.device.type == "cpu"
                and (mask is not None or t == 1 or t == kv_len) and (mask is None or mask.shape[-1] == kv_len)
                and any(p is not None for p in self.layer_plans()))

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
        row-invariant kernels (``kernel_setup.set_weights``; which formats are, the module docstring says)."""

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
        whole: Callable[[int, group_kernel.LayerPlan, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Layers [start, end) on x; ``attend(layer index, attention, normed x, cos, sin)`` says where
        each layer's attention reads and writes its keys and values. ``whole(index, plan, x, cos,
        sin)``, where given, runs a layer that has a plan (``layer_plans``) in one C call, in place."""
        # Dense layers see 2-D [tokens, hidden] activations (what GEMM kernels and EMS-SD's packed
        # batches want); attention reshapes per row.
        end = self.cfg.num_layers if end is None else end
        tables = {}  # one cos/sin lookup per RoPE in use (Gemma 3's local and global layers differ)
        plans = self.layer_plans() if whole is not None else None
        if plans is not None:
            x = x.contiguous().clone()  # updated in place from here: the caller's tensor stays as it was
        for i in range(start, end):
            layer = self.model.layers[i]
            if layer.rope not in tables:
                tables[layer.rope] = self.rope(positions, layer.rope)
            cos, sin = tables[layer.rope]
            if plans is not None and plans[i] is not None:
                whole(i, plans[i], x, cos, sin)  # type: ignore[misc]
                continue
            if self.cfg.sandwich_norms:
                x = x + layer.post_attention_layernorm(attend(i, layer.self_attn, layer.input_layernorm(x), cos, sin))
                x = x + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(x)))
                continue
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

        def whole(i: int, plan: group_kernel.LayerPlan, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
            group_kernel.decode_layer(plan, h, cos, sin, cache.k[i], cache.v[i], packing.slots, packing.grid, kv_len,
                                      mask, packing.rows, packing.row_counts, packing.row_ends)

        # one token per row: the packed order is the attention grid's, which the C layer expects
        fused = whole if packing.grid[1] == 1 and self._fusable(x, 1, kv_len, mask) else None
        x = self._layers(x, packing.positions, attend, start, None, fused)
        return self.logits(x) if head else self.model.norm(x)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """LM head on final-norm features: [..., hidden] → [..., vocab] (fp32)."""
        logits = self.lm_head(features).float()
        if self.cfg.final_softcap:
            logits = torch.tanh(logits / self.cfg.final_softcap) * self.cfg.final_softcap
        return logits

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
