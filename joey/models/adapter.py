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

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from joey.errors import ModelFormatError
from joey.models.kv_cache import KVCache
from joey.models.llama import MLP, Attention, LlamaModel, ModelConfig, RMSNorm

FORMAT = "joey-kangaroo-adapter/1"


def model_fingerprint(model: LlamaModel) -> str:
    """A short hash of the first embedding rows, rounded to bf16 so fp32 and bf16 loads agree."""
    rows = model.model.embed_tokens.weight[:64].detach().float().cpu().to(torch.bfloat16)
    return hashlib.sha256(rows.view(torch.int16).numpy().tobytes()).hexdigest()[:16]


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
        return adapter.to(model.lm_head.weight.device, model.lm_head.weight.dtype)

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
        h = hidden + self.self_attn(
            self.input_layernorm(hidden), shape, cos, sin, cache.k[0], cache.v[0], slots, kv_len, mask
        )
        if self.mlp is not None:
            h = h + self.mlp(self.post_attention_layernorm(h))
        return self.norm(h)


def save_adapter(adapter: KangarooAdapter, model: LlamaModel, path: str | Path, extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    meta = {
        "format": FORMAT,
        "exit_layer": adapter.exit_layer,
        "mlp": adapter.mlp is not None,
        "hidden_size": model.cfg.hidden_size,
        "vocab_size": model.cfg.vocab_size,
        "num_layers": model.cfg.num_layers,
        "fingerprint": model_fingerprint(model),
        **(extra or {}),
    }
    # fp16 on disk: half the size, and drafting precision cannot affect the output (the target verifies)
    state = {k: v.detach().half().cpu().contiguous() for k, v in adapter.state_dict().items() if k != "vocab"}
    state["vocab"] = adapter.vocab.cpu().to(torch.int32)
    save_file(state, str(path), metadata={"joey": json.dumps(meta)})


def read_adapter_meta(path: str | Path) -> dict:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("joey")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFormatError(f"{path}: not a readable adapter file ({str(exc).splitlines()[0][:120]})")
    try:
        meta = json.loads(raw) if raw else None
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelFormatError(f"{path}: not a joey Kangaroo adapter (no '{FORMAT}' metadata)")
    return meta


def load_adapter(path: str | Path, model: LlamaModel) -> KangarooAdapter:
    """Read an adapter file and check that it belongs to ``model``; ModelFormatError otherwise."""
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise ModelFormatError(f"adapter file not found: {p}")
    meta = read_adapter_meta(p)
    cfg = model.cfg
    for key, have in (("hidden_size", cfg.hidden_size), ("vocab_size", cfg.vocab_size), ("num_layers", cfg.num_layers)):
        if meta.get(key) != have:
            raise ModelFormatError(
                f"{p}: adapter was trained for a model with {key}={meta.get(key)}, this model has {have}"
            )
    if meta.get("fingerprint") != model_fingerprint(model):
        raise ModelFormatError(f"{p}: adapter was trained for a different model ({meta.get('base_model', 'unknown')})")
    exit_layer = meta.get("exit_layer")
    if not isinstance(exit_layer, int) or not 1 <= exit_layer < cfg.num_layers:
        raise ModelFormatError(f"{p}: invalid exit layer {exit_layer!r}")
    state = load_file(str(p))
    vocab = state.get("vocab")
    if vocab is None or vocab.ndim != 1 or int(vocab.max()) >= cfg.vocab_size or int(vocab.min()) < 0:
        raise ModelFormatError(f"{p}: missing or invalid draft vocabulary")
    state = {k: v.float() for k, v in state.items()}
    state["vocab"] = vocab.long()
    adapter = KangarooAdapter(cfg, exit_layer, vocab, mlp=bool(meta.get("mlp", False)))
    try:
        adapter.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelFormatError(f"{p}: adapter weights do not fit this model ({str(exc).splitlines()[0][:120]})")
    w = model.lm_head.weight
    return adapter.to(w.device, w.dtype).eval()


def find_adapter(model: LlamaModel, folder: Path | None = None) -> Path | None:
    """The adapter shipped inside joey (``joey/adapters/*.safetensors``) that matches ``model``, if any."""
    folder = folder or Path(__file__).resolve().parent.parent / "adapters"
    if not folder.is_dir():
        return None
    fp = model_fingerprint(model)
    for path in sorted(folder.glob("*.safetensors")):
        try:
            meta = read_adapter_meta(path)
        except ModelFormatError:
            continue
        if meta.get("fingerprint") == fp and meta.get("hidden_size") == model.cfg.hidden_size:
            return path
    return None
