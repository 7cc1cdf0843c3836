"""The shape of a decoder, read from a Hugging Face config.json: ``ModelConfig`` and the rules that
turn each family's config (llama incl. 3.x, mistral, smollm, qwen2, qwen3, phi3, gemma2, gemma3) into
its fields. The families differ only in this data (RoPE variant, sliding windows, q/k norms, norm
placement, activation, scales, soft-caps); ``joey.models.llama``'s modules read it, and
``ModelConfig.features`` says in words what a model uses beyond a plain Llama decoder (``joey info``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from joey.errors import UnsupportedArchitectureError
from joey.models.rope import RopeConfig

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3", "Phi3ForCausalLM": "phi3", "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
}
_MODEL_TYPES = {"gemma3_text": "gemma3"}  # configs that name only a model type
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a decoder, read from a Hugging Face config.json. Families differ only here:
    every field past ``attention_bias`` defaults to plain Llama."""

    architecture: str  # the family: llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    rope: RopeConfig = RopeConfig()
    local_rope: RopeConfig | None = None  # RoPE of the sliding-window layers when theirs differs (Gemma 3)
    sliding_window: int | None = None  # a query sees the keys of its last ``sliding_window`` positions
    sliding_layers: tuple[bool, ...] = ()  # which layers use the window (all of them when empty)
    qk_norm: bool = False  # RMSNorm on each query and key head before RoPE (Qwen3, Gemma 3)
    norm_offset: float = 0.0  # checkpoints store norm weights minus this (Gemma's 1 + w); added at load
    sandwich_norms: bool = False  # norms after attention and around the MLP too (Gemma 2 and 3)
    activation: str = "silu"  # of the gated MLP: silu (SwiGLU), gelu_tanh or gelu (GeGLU)
    embed_scale: float = 1.0  # embeddings are multiplied by this (Gemma: sqrt(hidden))
    attn_scale: float | None = None  # query scale; None = head_dim ** -0.5
    attn_softcap: float | None = None  # scores become cap * tanh(scores / cap)
    final_softcap: float | None = None  # the same on the output logits

    @property
    def rope_theta(self) -> float:
        return self.rope.theta

    def is_sliding(self, layer: int) -> bool:
        return self.sliding_window is not None and (not self.sliding_layers or self.sliding_layers[layer])

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of ``layer``, None where it attends to every earlier position."""
        return self.sliding_window if self.is_sliding(layer) else None

    def layer_rope(self, layer: int) -> RopeConfig:
        return self.local_rope if self.local_rope is not None and self.is_sliding(layer) else self.rope

    def features(self) -> list[str]:
        """What this model uses beyond a plain Llama decoder, in words (``joey info``)."""
        out = []
        if self.rope.kind != "default" or self.rope.rotary_fraction != 1.0:
            out.append(f"RoPE {self.rope.describe()}")
        if self.local_rope is not None:
            out.append(f"local RoPE {self.local_rope.describe()}")
        if self.sliding_window is not None:
            glob = [i for i in range(self.num_layers) if not self.is_sliding(i)]
            every = glob[0] + 1 if glob else 0
            if not glob:
                where = "all layers"
            elif glob == list(range(every - 1, self.num_layers, every)):
                where = f"every {_ordinal(every)} layer global"
            else:
                where = f"{self.num_layers - len(glob)} of {self.num_layers} layers"
            out.append(f"sliding window {self.sliding_window} ({where})")
        if self.head_dim * self.num_heads != self.hidden_size:
            out.append(f"head dim {self.head_dim}")
        if self.num_kv_heads != self.num_heads:
            out.append(f"grouped-query attention ({self.num_heads}/{self.num_kv_heads} heads)")
        if self.qk_norm:
            out.append("q/k norm")
        if self.attention_bias:
            out.append("q/k/v bias")
        if self.sandwich_norms:
            out.append("pre/post norms")
        if self.norm_offset:
            out.append(f"norms scale by ({self.norm_offset:g} + w)")
        if self.activation != "silu":
            out.append(f"{self.activation} MLP")
        if self.embed_scale != 1.0:
            out.append(f"embeddings x {self.embed_scale:.4g}")
        if self.attn_scale is not None:
            out.append(f"attention scale {self.attn_scale:.4g}")
        if self.attn_softcap:
            out.append(f"attention soft-cap {self.attn_softcap:g}")
        if self.final_softcap:
            out.append(f"logit soft-cap {self.final_softcap:g}")
        if self.tie_word_embeddings:
            out.append("tied embeddings")
        return out

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        archs = hf.get("architectures") or []
        model_type = hf.get("model_type", "")
        arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None and model_type in (*SUPPORTED_ARCHITECTURES.values(), *_MODEL_TYPES):
            arch = _MODEL_TYPES.get(model_type, model_type)
        if arch is None:
            name = ", ".join(archs) or model_type or "unknown"
            raise UnsupportedArchitectureError(
                f"unsupported architecture '{name}'; joey supports {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        gemma = arch in ("gemma2", "gemma3")
        for flag, what in (("use_bidirectional_attention", "bidirectional attention"), ("mlp_bias", "MLP biases")):
            if hf.get(flag):
                raise UnsupportedArchitectureError(f"unsupported feature of this {arch} model: {what}")
        act_name = hf.get("hidden_activation") or hf.get("hidden_act") or ("gelu_pytorch_tanh" if gemma else "silu")
        if act_name not in ACTIVATIONS:
            raise UnsupportedArchitectureError(f"unsupported activation '{act_name}' in a {arch} model")
        num_heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        num_layers = hf["num_hidden_layers"]
        head_dim = hf.get("head_dim") or hidden // num_heads
        max_pos = hf.get("max_position_embeddings", 2048)
        rope, local_rope = _read_rope(hf, arch, max_pos)
        for r in (rope, local_rope):
            if r is not None and r.kind == "longrope" and len(r.short_factor) != r.rotary_dim(head_dim) // 2:
                raise UnsupportedArchitectureError("RoPE type 'longrope' needs a short factor per rotary pair")
        window, sliding_layers = _read_window(hf, arch, num_layers)
        if not any(sliding_layers) and sliding_layers:
            window = None
        query_scalar = hf.get("query_pre_attn_scalar") if gemma else None
        return cls(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
            attention_bias=bool(hf.get("attention_bias", arch == "qwen2")),
            rope=rope,
            local_rope=local_rope if local_rope != rope and window is not None else None,
            sliding_window=window,
            sliding_layers=sliding_layers if not all(sliding_layers) else (),
            qk_norm=arch in ("qwen3", "gemma3"),
            norm_offset=1.0 if gemma else 0.0,
            sandwich_norms=gemma,
            activation=ACTIVATIONS[act_name],
            embed_scale=hidden**0.5 if gemma else 1.0,
            attn_scale=float(query_scalar) ** -0.5 if query_scalar else None,
            # Gemma 3 configs may carry Gemma 2's attention soft-cap, but the reference Gemma 3
            # attention does not apply it (and released Gemma 3 models set none)
            attn_softcap=hf.get("attn_logit_softcapping") if arch == "gemma2" else None,
            final_softcap=hf.get("final_logit_softcapping") if gemma else None,
        )


def _ordinal(n: int) -> str:
    return {1: "1st", 2: "2nd", 3: "3rd"}.get(n, f"{n}th")


def _read_rope(hf: dict[str, Any], arch: str, max_pos: int) -> tuple[RopeConfig, RopeConfig | None]:
    """The global RoPE and, for Gemma 3, the local layers' one. transformers 5 keeps ``rope_theta``
    and the scaling in ``rope_parameters`` (per layer type for Gemma 3); older configs have
    ``rope_theta`` + ``rope_scaling`` (+ Gemma's ``rope_local_base_freq``)."""
    fraction = float(hf.get("partial_rotary_factor") or 1.0)
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and set(params) & set(LAYER_TYPES):
        full = RopeConfig.from_hf(params.get("full_attention"), 1e6 if arch == "gemma3" else 10000.0, fraction,
                                  max_pos)
        local = RopeConfig.from_hf(params.get("sliding_attention"), 10000.0, fraction, max_pos)
        return full, local
    theta = float(hf.get("rope_theta") or (1e6 if arch == "gemma3" else 10000.0))
    rope = RopeConfig.from_hf(params or hf.get("rope_scaling"), theta, fraction, max_pos)
    if arch == "gemma3":
        return rope, RopeConfig(theta=float(hf.get("rope_local_base_freq") or 10000.0), rotary_fraction=fraction)
    return rope, None


def _read_window(hf: dict[str, Any], arch: str, num_layers: int) -> tuple[int | None, tuple[bool, ...]]:
    """The sliding window and which layers use it (empty: all), from ``layer_types`` where the config
    has them, else each family's own rule."""
    window = hf.get("sliding_window")
    if not window or not hf.get("use_sliding_window", True):  # Qwen2/3 keep a window they do not use
        return None, ()
    types = hf.get("layer_types")
    if types:
        unknown = sorted(set(types) - set(LAYER_TYPES))
        if unknown:
            raise UnsupportedArchitectureError(f"unsupported attention layer type '{unknown[0]}' in a {arch} model")
        return int(window), tuple(t == "sliding_attention" for t in types)
    if arch in ("gemma2", "gemma3"):  # every 2nd (Gemma 2) or 6th (Gemma 3) layer is global
        pattern = int(hf.get("sliding_window_pattern") or (2 if arch == "gemma2" else 6))
        return int(window), tuple((i + 1) % pattern != 0 for i in range(num_layers))
    if arch in ("qwen2", "qwen3"):
        first = int(hf.get("max_window_layers", num_layers))
        return int(window), tuple(i >= first for i in range(num_layers))
    return int(window), ()

