"""Attribution patching: every head's effect on a loss from one backward pass.

Each head's output is multiplied by a gate g (``head_scale`` of the op), g = 1, and
score = d loss / d g at g = 1. With the default zero baseline the head output is g * attn, so
score = <d loss / d out_h, attn_h> and  -score  is the first-order estimate of the loss change
when the head is zero-ablated. With a baseline b (``mean_head_outputs`` or
``cache_head_outputs``), out_h = g * attn_h + (1 - g) * b_h and -score estimates the change under
mean ablation / patching.
"""

from __future__ import annotations

from typing import Callable, Optional

import pandas as pd
import torch


def head_attribution(session, loss_fn: Callable[[], torch.Tensor], baseline: Optional[dict] = None,
                     layers=None) -> pd.DataFrame:
    """Scores of every head of session (or of the named layers) as a DataFrame [layer, head, score].

    Args:
        session: a ``Session``.
        loss_fn: runs the forward pass(es) with autograd enabled and returns a scalar tensor.
        baseline: None (zero ablation) or {layer: (H, Nq, Dv) mean | (Bc, H, Nq, Dv) cache}.
        layers: layer names to score (default: all).

    Inside ``session.intervene`` the gates multiply Zero/Scale interventions' head scales;
    Mean/Patch/Uniform interventions cannot be combined (NotImplementedError).
    """
    names = session.layer_names if layers is None else list(layers)
    device = next((p.device for p in session.model.parameters()), torch.device("cpu"))
    gates = {name: torch.ones(session.layer(name).heads, device=device, requires_grad=True) for name in names}
    with session.gate(gates, baseline):
        loss = loss_fn()
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"loss_fn must return a scalar tensor, got {getattr(loss, 'shape', type(loss))}")
    if not loss.requires_grad:
        raise ValueError("loss_fn returned a loss without a graph: run the forward pass with autograd enabled "
                         "(not under torch.no_grad / inference_mode)")
    grads = torch.autograd.grad(loss.reshape(()), list(gates.values()), allow_unused=True)
    rows = []
    for name, g, grad in zip(names, gates.values(), grads):
        # A layer that did not run has no path to the loss: its exact derivative is 0.
        values = torch.zeros_like(g) if grad is None else grad
        rows.extend({"layer": name, "head": h, "score": float(v)} for h, v in enumerate(values.tolist()))
    return pd.DataFrame(rows, columns=["layer", "head", "score"])
