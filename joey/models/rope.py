"""Rotary position embeddings: the RoPE variants checkpoints use, as data, and the cos/sin tables.

A checkpoint's config names a RoPE type (``rope_scaling`` in older configs, ``rope_parameters`` in
transformers 5, where ``rope_theta`` moved inside too). Each type only changes the inverse
frequencies and, for some, scales cos/sin by an "attention factor":

- ``default``: theta ** (-2i / dim);
- ``linear``: positions divided by ``factor`` (position interpolation);
- ``llama3`` (Llama 3.1-3.3): long wavelengths divided by ``factor``, short ones kept, a smooth
  blend in between (bounds from ``low_freq_factor`` / ``high_freq_factor`` of the original context);
- ``yarn``: a per-dimension blend of interpolated and original frequencies between two correction
  dimensions, with cos/sin scaled by 0.1 ln(factor) + 1 (or the ``mscale`` ratio / given factor);
- ``longrope`` (Phi-3's ``su``): per-dimension divisors, ``short_factor`` inside the original
  context and ``long_factor`` beyond it, cos/sin scaled by sqrt(1 + ln(factor) / ln(original));
- ``dynamic`` (NTK): equal to ``default`` for every position inside ``max_position_embeddings``,
  which is joey's context limit, so it is read as ``default``.

A partial rotary factor rotates only the first ``rotary_dim`` channels of each head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from joey.errors import UnsupportedArchitectureError

ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope", "dynamic")


@dataclass(frozen=True)
class RopeConfig:
    """One RoPE variant and its parameters (a model may use two: Gemma 3's local and global layers)."""

    kind: str = "default"
    theta: float = 10000.0
    rotary_fraction: float = 1.0  # partial_rotary_factor: share of each head's channels that rotate
    factor: float = 1.0
    original_context: int | None = None  # original_max_position_embeddings
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    truncate: bool = True  # yarn: round the correction range outwards
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    attention_factor: float | None = None  # yarn / longrope: explicit cos/sin scale
    short_factor: tuple[float, ...] = field(default=())  # longrope
    long_factor: tuple[float, ...] = field(default=())  # longrope

    @classmethod
    def from_hf(cls, params: dict[str, Any] | None, theta: float, rotary_fraction: float,
                max_position_embeddings: int) -> RopeConfig:
        """Read one ``rope_parameters`` / ``rope_scaling`` dict (None or empty: plain RoPE)."""
        params = params or {}
        kind = params.get("rope_type", params.get("type")) or "default"
        if kind == "su":  # Phi-3's early name for longrope
            kind = "longrope"
        if kind not in ROPE_TYPES:
            raise UnsupportedArchitectureError(
                f"unsupported RoPE type '{kind}'; joey supports {', '.join(ROPE_TYPES)}")
        if kind == "dynamic":
            kind = "default"  # see the module docstring: identical inside the context joey allows
        original = params.get("original_max_position_embeddings")
        factor = params.get("factor")
        if factor is None and original and kind in ("yarn", "longrope"):
            # configs that omit it mean the stretch from the original context to the current one
            factor = max_position_embeddings / original
        if kind in ("yarn", "llama3") and original is None:
            raise UnsupportedArchitectureError(f"RoPE type '{kind}' needs original_max_position_embeddings")
        return cls(
            kind=kind,
            theta=float(params.get("rope_theta", theta)),
            rotary_fraction=float(params.get("partial_rotary_factor", rotary_fraction)),
            factor=float(factor if factor is not None else 1.0),
            original_context=original,
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            beta_fast=float(params.get("beta_fast") or 32.0),
            beta_slow=float(params.get("beta_slow") or 1.0),
            truncate=bool(params.get("truncate", True)),
            mscale=params.get("mscale"),
            mscale_all_dim=params.get("mscale_all_dim"),
            attention_factor=params.get("attention_factor"),
            short_factor=tuple(float(x) for x in params.get("short_factor") or ()),
            long_factor=tuple(float(x) for x in params.get("long_factor") or ()),
        )

    def rotary_dim(self, head_dim: int) -> int:
        return int(head_dim * self.rotary_fraction)

    def describe(self) -> str:
        """Short text for ``joey info``."""
        text = f"{self.kind} (theta {self.theta:g}"
        if self.kind != "default":
            text += f", factor {self.factor:g}"
        if self.rotary_fraction != 1.0:
            text += f", rotary share {self.rotary_fraction:g}"
        return text + ")"


def _plain_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


def _llama3(rope: RopeConfig, inv_freq: torch.Tensor) -> torch.Tensor:
    """Divide low frequencies (wavelength beyond original / low_freq_factor) by ``factor``, keep
    high ones (wavelength below original / high_freq_factor), blend linearly in 1/wavelength between."""
    assert rope.original_context is not None
    wavelength = 2 * math.pi / inv_freq
    ctx = rope.original_context
    blend = ((ctx / wavelength - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)).clamp(0, 1)
    return (1 - blend) * inv_freq / rope.factor + blend * inv_freq


def _yarn(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    """Dimensions that turn fewer than ``beta_slow`` times over the original context are
    interpolated, those that turn more than ``beta_fast`` times are kept, a linear ramp between."""
    assert rope.original_context is not None
    base = _plain_inv_freq(rope.theta, dim)

    def dim_for(turns: float) -> float:  # the channel pair that completes ``turns`` rotations
        return dim * math.log(rope.original_context / (turns * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = dim_for(rope.beta_fast), dim_for(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a zero-width ramp would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 = original frequency, 0 = interpolated
    inv_freq = base / rope.factor * (1 - keep) + base * keep

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if rope.attention_factor is not None:
        attn = float(rope.attention_factor)
    elif rope.mscale and rope.mscale_all_dim:
        attn = mscale(rope.factor, rope.mscale) / mscale(rope.factor, rope.mscale_all_dim)
    else:
        attn = mscale(rope.factor)
    return inv_freq, attn


def _longrope_scale(rope: RopeConfig) -> float:
    if rope.attention_factor is not None:
        return float(rope.attention_factor)
    if rope.factor <= 1.0 or not rope.original_context:
        return 1.0
    return math.sqrt(1 + math.log(rope.factor) / math.log(rope.original_context))


def rope_table(
    rope: RopeConfig, head_dim: int, max_len: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for positions [0, max_len), [max_len, rotary_dim] each, fp32 (computed in float64)."""
    dim = rope.rotary_dim(head_dim)
    positions = torch.arange(max_len, dtype=torch.float64)
    scale = 1.0
    if rope.kind == "longrope":
        # Short factors inside the original context, long ones past it, per position: what
        # transformers gives a sequence decoded token by token (it re-encodes a whole prompt
        # that crosses the boundary with the long factors; joey does not).
        short = _plain_inv_freq(rope.theta, dim) / torch.tensor(rope.short_factor, dtype=torch.float64)
        long = _plain_inv_freq(rope.theta, dim) / torch.tensor(rope.long_factor or rope.short_factor,
                                                                dtype=torch.float64)
        inside = (positions < (rope.original_context or max_len))[:, None]
        freqs = torch.where(inside, torch.outer(positions, short), torch.outer(positions, long))
        scale = _longrope_scale(rope)
    else:
        if rope.kind == "yarn":
            inv_freq, scale = _yarn(rope, dim)
        else:
            inv_freq = _plain_inv_freq(rope.theta, dim)
            if rope.kind == "linear":
                inv_freq = inv_freq / rope.factor
            elif rope.kind == "llama3":
                inv_freq = _llama3(rope, inv_freq)
        freqs = torch.outer(positions, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return (emb.cos() * scale).float().to(device), (emb.sin() * scale).float().to(device)
