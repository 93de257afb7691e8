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


def _gate_gradients(session, loss_fn: Callable[[], torch.Tensor], value: float, baseline: Optional[dict],
                    names: list) -> list:
    """[d loss / d g (H,)] per layer of names, every gate of those layers at ``value``."""
    device = next((p.device for p in session.model.parameters()), torch.device("cpu"))
    gates = {name: torch.full((session.layer(name).heads,), float(value), device=device, requires_grad=True)
             for name in names}
    with session.gate(gates, baseline):
        loss = loss_fn()
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"loss_fn must return a scalar tensor, got {getattr(loss, 'shape', type(loss))}")
    if not loss.requires_grad:
        raise ValueError("loss_fn returned a loss without a graph: run the forward pass with autograd enabled "
                         "(not under torch.no_grad / inference_mode)")
    grads = torch.autograd.grad(loss.reshape(()), list(gates.values()), allow_unused=True)
    # A layer that did not run has no path to the loss: its exact derivative is 0.
    return [torch.zeros_like(g) if grad is None else grad.detach() for g, grad in zip(gates.values(), grads)]


def _frame(names: list, grads: list) -> pd.DataFrame:
    rows = [{"layer": name, "head": h, "score": float(v)} for name, g in zip(names, grads) for h, v in enumerate(g.tolist())]
    return pd.DataFrame(rows, columns=["layer", "head", "score"])


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
    return _frame(names, _gate_gradients(session, loss_fn, 1.0, baseline, names))


def integrated_head_attribution(session, loss_fn: Callable[[], torch.Tensor], steps: int,
                                baseline: Optional[dict] = None, layers=None) -> pd.DataFrame:
    """Integrated gradients over the gates, [layer, head, score] as ``head_attribution``'s.

    Every gate moves together from 0 (every head ablated) to 1 (the model), and score is the
    mean of d loss / d g_h at the ``steps`` midpoints (k + 1/2) / steps: the midpoint rule for
    the integral of the gradient along that path. So -score is head h's share of the loss change
    between the model and the model with every head ablated (the shares add up to it as steps
    grow: completeness), where ``head_attribution``'s -score is the slope at g = 1 alone. Where
    the loss is linear in the gates both equal each head's exact ablation effect. One backward
    pass per step.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    names = session.layer_names if layers is None else list(layers)
    total = None
    for k in range(steps):
        grads = _gate_gradients(session, loss_fn, (k + 0.5) / steps, baseline, names)
        total = grads if total is None else [a + g for a, g in zip(total, grads)]
    return _frame(names, [g / steps for g in total])
