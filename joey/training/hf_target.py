"""The distillation target as a transformers model placed by accelerate (``--device-map``).

For targets too large for one device: ``AutoModelForCausalLM.from_pretrained(folder, device_map=...)``
spreads the frozen float target's layers over the GPUs (and CPU memory) it finds, and
:func:`answer_batch_hf` answers a batch with it, writing exactly what
:func:`joey.training.distill.answer_batch` writes: the same greedy answers, the hidden states after
the exit layers, the final-norm features and the top-k distributions. Only the distillation forward
is placed this way; the trainer still uses joey's own copy of the model (its embedding, LM head and
the layers an adapter starts from).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from joey.models.registry import ModelSource
from joey.training.distill import FEATURE, DistillSettings, shard_row


def load_hf_target(source: ModelSource, device_map: str):
    """The float target, frozen, its layers placed by accelerate's ``device_map``."""
    model = source.transformers_model(device_map=device_map, dtype=torch.float32)
    return model.eval().requires_grad_(False)


def _step(model, tokens, mask, positions, cache, s: DistillSettings) -> tuple[dict, torch.Tensor]:
    """One forward; returns ({layer or FEATURE: [B,T,h] fp16 on the CPU}, fp32 logits [B,T,vocab] on the CPU).
    ``hidden_states[l]`` is the output of layer l (l ≥ 1) and the last entry is after the final norm."""
    # transformers ≥ 5.24 names the KV cache argument ``cache`` (``past_key_values`` before)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=tokens, attention_mask=mask, position_ids=positions, use_cache=True,
                output_hidden_states=True, **{name: cache})
    hs = out.hidden_states
    kept = {e: hs[e].to("cpu", torch.float16) for e in s.exit_layers}
    if s.features:
        kept[FEATURE] = hs[-1].to("cpu", torch.float16)
    return kept, out.logits.float().cpu()


@torch.inference_mode()
def answer_batch_hf(model, prompts: Sequence[list[int]], eos_ids: frozenset[int], s: DistillSettings) -> list[dict]:
    """:func:`joey.training.distill.answer_batch` with a transformers model (left-padded batch, HF KV cache).
    Rows that have finished keep running (on their last token) until every row has; those outputs are dropped."""
    from transformers import DynamicCache

    dev = model.get_input_embeddings().weight.device
    b = len(prompts)
    lengths = [len(p) for p in prompts]
    t = max(lengths)
    tokens = torch.zeros(b, t, dtype=torch.long)
    mask = torch.zeros(b, t, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding: every row's next token goes in the same column
        tokens[i, t - len(p):] = torch.tensor(p)
        mask[i, t - len(p):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    kept, logits = _step(model, tokens.to(dev), mask.to(dev), positions.to(dev), cache, s)
    keys = list(kept)
    rows = [
        {"ids": list(p), "prompt_len": len(p), "hidden": {e: [kept[e][i, t - len(p):]] for e in keys},
         "top_ids": [], "top_p": []}
        for i, p in enumerate(prompts)
    ]
    last = logits[:, -1]
    active = set(range(b))
    lens = torch.tensor(lengths)
    for step in range(s.max_new_tokens):
        probs = torch.softmax(last, dim=-1)
        top_p, top_ids = probs.topk(s.top_k, dim=-1)
        nxt = last.argmax(-1)
        for r in sorted(active):
            row = rows[r]
            row["top_ids"].append(top_ids[r].to(torch.int32))
            row["top_p"].append(top_p[r].to(torch.float16))
            row["ids"].append(int(nxt[r]))
            if int(nxt[r]) in eos_ids or step + 1 >= s.max_new_tokens:
                active.discard(r)
        if not active:
            break
        mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.long)], dim=1)
        kept, logits = _step(model, nxt[:, None].to(dev), mask.to(dev), lens[:, None].to(dev), cache, s)
        lens = lens + 1
        for r in active:
            for e in keys:
                rows[r]["hidden"][e].append(kept[e][r])
        last = logits[:, 0]
    return [shard_row(row) for row in rows]
