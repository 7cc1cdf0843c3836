"""Which kernels a ``LlamaModel``'s linear layers run (``joey.models.weight_formats``), and the state
that follows from that choice: the format's name, the whole-layer C plans built on those kernels, and
where the LM head's rows come from when no float copy of it is kept.

``KernelSetup`` is that state, one per model (``LlamaModel.kernel_setup``): it swaps kernels into
the model's ``Linear`` modules (and the fused q/k/v and gate/up kernels of its attention and MLP
blocks); the model's forward paths only run whatever is set there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch

from joey.models import group_kernel
from joey.models.quantized import QuantizedWeight
from joey.models.weight_formats import LinearKernel, make_kernel

if TYPE_CHECKING:  # llama.py builds a KernelSetup in every model, so this module may not import it at runtime
    from joey.models.llama import DecoderLayer, Linear, LlamaModel, WeightSource

_NARROWEST_FIRST = ("int4", "int5", "int6", "int8", "bf16", "fp32")


def mixed_format(formats: Iterable[str]) -> str:
    """The name of a model whose kernels run these formats: each once, narrowest first ("int4+int6")."""
    parts = {p for f in formats for p in f.split("+")}
    return "+".join(sorted(parts, key=lambda p: _NARROWEST_FIRST.index(p) if p in _NARROWEST_FIRST else -1))


def layer_linears(layer: DecoderLayer) -> tuple[Linear, ...]:
    """A decoder layer's linear layers: q, k, v, o, then gate, up, down."""
    a, m = layer.self_attn, layer.mlp
    return a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj


class KernelSetup:
    """The kernels ``decoder``'s linear layers run and the state kept with them. Plain float
    weights (no kernels) until ``prepack``, ``set_weights`` or ``use_kernels`` sets some."""

    def __init__(self, decoder: LlamaModel) -> None:
        self.decoder = decoder
        self.format: str | None = None  # set_weights' format; None = plain float weights
        self.plans: list[group_kernel.LayerPlan | None] | None = None  # layer_plans(), built on first use
        # rows of the LM head where its float weight is not kept (a GGUF's head stays in its blocks)
        self.head_rows: Callable[[torch.Tensor], torch.Tensor] | None = None

    def use_kernels(self, kernels: dict[str, LinearKernel], head_rows: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Run the linear layers on ready-made kernels (a GGUF's blocks laid out for joey's kernel),
        keeping no float weights: per layer i ``model.layers.{i}.self_attn.qkv`` (q, k, v fused),
        ``...self_attn.o_proj``, ``...mlp.gate_up`` (fused), ``...mlp.down_proj``, and ``lm_head``.
        ``head_rows``: what ``LlamaModel.head_rows`` reads instead of a float head."""
        model = self.decoder
        self.plans = None
        for i, layer in enumerate(model.model.layers):
            a, m, p = layer.self_attn, layer.mlp, f"model.layers.{i}"
            a._qkv, a.o_proj.kernel = kernels[f"{p}.self_attn.qkv"], kernels[f"{p}.self_attn.o_proj"]
            m._gate_up, m.down_proj.kernel = kernels[f"{p}.mlp.gate_up"], kernels[f"{p}.mlp.down_proj"]
            for lin in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):
                lin.kernel = None
            for lin in layer_linears(layer):
                lin.weight = None  # type: ignore[assignment]
        model.lm_head.kernel = kernels["lm_head"]
        model.lm_head.weight = None  # type: ignore[assignment]
        self.head_rows = head_rows
        self.format = mixed_format(k.format for k in self.kernels())

    def prepack(self) -> bool:
        """Pre-pack every linear layer for oneDNN (fp32 CPU only); returns whether it did."""
        model = self.decoder
        if model.device.type != "cpu" or model.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
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
        model = self.decoder
        native = native or {}
        bits = {"int4": 4, "int8": 8}.get(fmt)
        self.plans = None  # they point into the kernels being replaced

        def src(name: str, lin: Linear) -> WeightSource:
            # "native": every stored block at its own bits; int4/int8: stored codes of exactly that
            # width, the rest quantized from the float copy; float formats: the float copy, which
            # is the exact dequantization of any stored blocks
            q = native.get(name)
            if q is not None and (fmt == "native" or q.bits == bits):
                return q
            return lin.weight

        for i, layer in enumerate(model.model.layers):
            a, m = layer.self_attn, layer.mlp
            p = f"model.layers.{i}"
            a.set_weights(fmt, [src(f"{p}.self_attn.{n}.weight", getattr(a, n)) for n in ("q_proj", "k_proj",
                                                                                           "v_proj", "o_proj")])
            m.set_weights(fmt, [src(f"{p}.mlp.{n}.weight", getattr(m, n)) for n in ("gate_proj", "up_proj",
                                                                                     "down_proj")])
        model.lm_head.kernel = make_kernel(fmt, src("lm_head.weight", model.lm_head))
        self.format = mixed_format(k.format for k in self.kernels())
        if not keep_float:
            for layer in model.model.layers:
                for lin in layer_linears(layer):
                    lin.weight = None  # type: ignore[assignment]

    @property
    def weight_format(self) -> str:
        """fp32, bf16, int8 or int4 (what set_weights chose; "int4+int8" for a mix, as a GGUF that
        keeps its LM head in 8 bits runs natively), or the float dtype of plain weights."""
        return self.format or str(self.decoder.dtype).replace("torch.", "").replace("float32", "fp32")

    def kernels(self) -> list[LinearKernel]:
        """Every kernel a decoding step runs (fused ones count once)."""
        model = self.decoder
        out: list[LinearKernel] = []
        for layer in model.model.layers:
            fused = [k for k in (layer.self_attn._qkv, layer.mlp._gate_up) if k is not None]
            out += fused + [lin.kernel for lin in layer_linears(layer) if lin.kernel is not None]
        if model.lm_head.kernel is not None:
            out.append(model.lm_head.kernel)
        return out

    def weight_bytes(self) -> int:
        """Bytes of linear-layer weights one decoding step reads (the kernels', else the float weights')."""
        kernels = self.kernels()
        if kernels:
            return sum(k.nbytes for k in kernels)
        model = self.decoder
        per = model.lm_head.weight.element_size()
        linears = [model.lm_head, *(lin for layer in model.model.layers for lin in layer_linears(layer))]
        return sum(lin.weight.numel() * per for lin in linears)

    def layer_plans(self) -> list[group_kernel.LayerPlan | None]:
        """Per layer, a plan that runs the whole layer in one C call (``group_kernel.decode_layer``),
        or None where a layer must run module by module: anything but a plain Llama-style layer whose
        four linear kernels are joey's low-bit ones (no sliding window, q/k norm, sandwich norms,
        partial rotary, soft-cap or gated activation other than SwiGLU)."""
        if self.plans is None:
            model = self.decoder
            cfg = model.cfg
            plain = (not cfg.sandwich_norms and not cfg.qk_norm and cfg.activation == "silu" and not cfg.attn_softcap
                     and model.ragged_attention)
            scale = cfg.attn_scale if cfg.attn_scale is not None else cfg.head_dim ** -0.5
            plans: list[group_kernel.LayerPlan | None] = []
            for layer in model.model.layers:
                a, m = layer.self_attn, layer.mlp
                ok = (plain and a.window is None and layer.rope.rotary_fraction == 1.0 and a._qkv is not None
                      and m._gate_up is not None)
                plans.append(group_kernel.layer_plan(
                    layer.input_layernorm.weight.data, layer.post_attention_layernorm.weight.data, cfg.rms_norm_eps,
                    scale, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                    [a._qkv, a.o_proj.kernel, m._gate_up, m.down_proj.kernel]) if ok else None)
            self.plans = plans
        return self.plans
