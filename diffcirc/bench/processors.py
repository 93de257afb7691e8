"""The implementations the UNet benchmark compares (configs.UNET_IMPLEMENTATIONS), as the attention
processors each installs:

  sdpa             diffusers' AttnProcessor2_0 (the baseline)
  fused            FusedAttnProcessor, no statistics
  fused+entropy    inside session.trace(Recorder(stats=("entropy",)))
  fused+all        entropy, distance, label_mass (with a label map)
  materialising    a hook computing the same entropy from attn.get_attention_scores (DAAM-style)
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from diffcirc.processor import FusedAttnProcessor, Recorder, Session


def set_processors(model, factory):
    """Gives every Attention module of model the processor factory(module name)."""
    for name, m in model.named_modules():
        if isinstance(m, Attention):
            m.set_processor(factory(name))


class MaterialisingEntropy:
    """diffusers' classic attention with probabilities from attn.get_attention_scores, from which it
    computes per-query entropy and keeps per-head running sums (what DAAM-style hooks do).

    sums[name] = [sum over queries (H,) float64, number of queries per head]."""

    def __init__(self, name: str, sums: dict):
        self.name, self.sums = name, sums

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, seq, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        query, key, value = (attn.head_to_batch_dim(t) for t in (query, key, value))
        probs = attn.get_attention_scores(query, key, attention_mask)  # (B*H, Nq, Nk): the N x N buffer
        entropy = -(probs * torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))).sum(-1)
        entropy = entropy.view(batch, attn.heads, -1)
        slot = self.sums.setdefault(self.name, [0.0, 0])
        slot[0] = slot[0] + entropy.double().sum(dim=(0, 2))
        slot[1] += entropy.shape[0] * entropy.shape[2]
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@contextmanager
def implementation(name: str, model, labels, state: dict):
    """Installs one implementation for the duration of the block, and AttnProcessor2_0 after it
    (even on error); state collects what it recorded ("recorder" or "sums")."""
    try:
        if name == "sdpa":
            set_processors(model, lambda n: AttnProcessor2_0())
            yield
        elif name == "fused":
            set_processors(model, lambda n: FusedAttnProcessor())
            yield
        elif name == "materialising":
            sums = state.setdefault("sums", {})
            set_processors(model, lambda n: MaterialisingEntropy(n, sums))
            yield
        else:
            stats = ("entropy",) if name == "fused+entropy" else ("entropy", "distance", "label_mass")
            recorder = state.setdefault("recorder", Recorder(stats=stats))
            set_processors(model, lambda n: AttnProcessor2_0())
            with Session(model).trace(recorder, labels=labels if "label_mass" in stats else None):
                yield
    finally:
        set_processors(model, lambda n: AttnProcessor2_0())


def mean_entropy(state: dict) -> dict | None:
    """{(layer, head): mean per-query entropy} from what an implementation recorded in state, or None."""
    if "recorder" in state:
        f = state["recorder"].to_frame()
        f = f[f.stat == "entropy"]
        return {(layer, head): m for layer, head, m in zip(f["layer"], f["head"], f["mean"])}
    if "sums" in state:
        return {(layer, head): (s / n)[head].item() for layer, (s, n) in state["sums"].items() for head in range(len(s))}
    return None
