"""Per-head interventions, applied inside the fused op through head_scale / head_replacement.

An intervention addresses heads as (layer, head) (layer: module path such as
``"mid_block.attentions.0"``; head: an index, a sequence of indices, or None for every head) and
optionally a subset of batch elements (``elements``: indices into the forward batch; None = all),
so one forward pass can run different conditions on different elements. For each addressed
(element, head) the op computes ``out_h = s * attn_h + (1 - s) * r_h``:

=============  =====  ====================================================================
mode           s      r (per position, (Nq, Dv))
=============  =====  ====================================================================
``Zero``       0      0
``Scale(a)``   a      0
``Mean(m)``    0      m[layer][head]: dataset-mean head output (``mean_head_outputs``)
``Patch(c)``   0      c[layer][e % Bc, head]: head output cached from another input
                      (``cache_head_outputs``); element e reads cached row e % Bc
``Uniform``    0      mean of V over the attended keys (attention-pattern ablation)
=============  =====  ====================================================================

Positions are the op's queries: on a joint layer (SD3, Flux, AuraFlow) every query of the joint
sequence, image and text, in the model's own order (SD3: image tokens first; Flux and AuraFlow:
text first), so ``Mean`` / ``Patch`` tables hold (H, N_img + N_txt, Dv) and an intervention acts
on the head for all of them.

Heads nobody addresses keep s = 1. When two interventions address the same (element, head),
the later one in the list (or the inner ``intervene`` context) wins. Nothing materialises the
attention matrix. Example::

    from diffcirc.processor import Session, Zero, Mean, mean_head_outputs
    session = Session(unet)
    means = mean_head_outputs(session, lambda x: unet(x, t).sample, loader)
    with session.intervene([Zero("mid_block.attentions.0", 3),
                            Mean("down_blocks.1.attentions.0", [0, 5], means=means, elements=[1])]):
        eps = unet(x, t).sample
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import torch

from .processor import AttentionCall

Heads = Union[int, Sequence[int], None]


@dataclass(frozen=True)
class Intervention(ABC):
    """Base of the modes below: layer (module path), head (int, ints or None = all), elements (ints or None = all)."""

    layer: str
    head: Heads = None
    elements: Optional[Sequence[int]] = None

    @abstractmethod
    def _apply(self, call: AttentionCall, rows: torch.Tensor, cols: torch.Tensor):
        """(s, replacement or None) for the addressed rows and cols (CPU index tensors); replacement:
        (n_elements, n_heads, Nq|1, Dv) on the call's device."""

    needs_positions = False  # whether the replacement varies with the query position


@dataclass(frozen=True)
class Zero(Intervention):
    """Ablate: the head's output becomes 0."""

    def _apply(self, call, rows, cols):
        return 0.0, None


@dataclass(frozen=True, kw_only=True)
class Scale(Intervention):
    """Multiply the head's output by alpha."""

    alpha: float

    def _apply(self, call, rows, cols):
        return float(self.alpha), None


@dataclass(frozen=True, kw_only=True)
class Mean(Intervention):
    """Replace the head's output by its dataset mean per position: means[layer] is (H, Nq, Dv)."""

    means: Mapping[str, torch.Tensor] = field(repr=False)
    needs_positions = True

    def _apply(self, call, rows, cols):
        m = _stored(self.means, call, self.layer, "means", "(H, Nq, Dv)")
        return 0.0, m[cols].unsqueeze(0).expand(len(rows), -1, -1, -1)


@dataclass(frozen=True, kw_only=True)
class Patch(Intervention):
    """Replace the head's output by one cached from another input: cache[layer] is (Bc, H, Nq, Dv)."""

    cache: Mapping[str, torch.Tensor] = field(repr=False)
    needs_positions = True

    def _apply(self, call, rows, cols):
        c = _stored(self.cache, call, self.layer, "cache", "(Bc, H, Nq, Dv)")
        src = rows % c.shape[0]
        return 0.0, c[src[:, None], cols[None, :]]


@dataclass(frozen=True)
class Uniform(Intervention):
    """Attention-pattern ablation: the head attends uniformly to its (unmasked) keys, i.e. outputs mean(V)."""

    def _apply(self, call, rows, cols):
        v = call.value[rows[:, None], cols[None, :]].float()  # (n, h, Nk, Dv)
        if call.key_padding_mask is None:
            mean = v.mean(dim=2)
        else:
            keep = call.key_padding_mask[rows].to(v.dtype)[:, None, :, None]  # (n, 1, Nk, 1)
            mean = (v * keep).sum(dim=2) / keep.sum(dim=2).clamp_min(1.0)
        return 0.0, mean.unsqueeze(2)


def _stored(table: Mapping[str, torch.Tensor], call: AttentionCall, layer: str, what: str, layout: str):
    """The layer's stored head outputs, checked against this call's positions, on its device."""
    t = _lookup(table, layer, what)
    _check_positions(t.shape[-3:], call, layer, what, layout)
    return t.to(call.value.device)


def _lookup(table: Mapping[str, torch.Tensor], layer: str, what: str) -> torch.Tensor:
    if layer not in table:
        raise KeyError(f"{what} has no entry for layer {layer!r} (it has {sorted(table)[:5]}...)")
    return table[layer]


def _check_positions(shape, call: AttentionCall, layer: str, what: str, expected: str):
    got = tuple(shape)
    want = (call.heads, call.n_queries, call.value.shape[-1])
    if got != want:
        raise ValueError(f"{what}[{layer!r}] must be {expected} with (H, Nq, Dv) = {want}, got trailing dims {got}")


def _index(values, n: int, what: str, layer: str) -> torch.Tensor:
    """The addressed batch elements or heads as a CPU index tensor (checked against n)."""
    if values is None:
        return torch.arange(n)
    if isinstance(values, int):
        values = [values]
    idx = torch.as_tensor(list(values) if not isinstance(values, torch.Tensor) else values, dtype=torch.long)
    if idx.dim() != 1 or (idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n)):
        raise IndexError(f"intervention on {layer!r}: {what} {idx.tolist()} out of range [0, {n})")
    return idx


def head_arguments(interventions: Sequence[Intervention], call: AttentionCall):
    """The op's (head_scale (B, H) float32 or None, head_replacement (B, H, Nq|1, Dv) float32 or None).

    interventions: those addressing call.layer, in order (later ones win).
    """
    if not interventions:
        return None, None
    device = call.value.device
    # the (B, H) scales are built on the host and moved once: indices and scales are host values,
    # and a copy per intervention would stall a GPU once per addressed layer and condition
    scale = torch.ones(call.batch, call.heads)
    rep = None
    positions = call.n_queries if any(iv.needs_positions for iv in interventions) else 1
    for iv in interventions:
        rows = _index(iv.elements, call.batch, "elements", iv.layer)
        cols = _index(iv.head, call.heads, "head", iv.layer)
        s, r = iv._apply(call, rows, cols)
        scale[rows[:, None], cols[None, :]] = s
        if r is not None and rep is None:
            rep = torch.zeros(call.batch, call.heads, positions, call.value.shape[-1], device=device)
        if rep is not None:
            rows_d, cols_d = rows.to(device), cols.to(device)
            rep[rows_d[:, None], cols_d[None, :]] = 0.0 if r is None else r.to(rep.dtype).expand(-1, -1, positions, -1)
    return scale.to(device), rep


def cache_head_outputs(session, forward_fn: Callable, *args, **kwargs) -> dict:
    """Runs forward_fn(*args, **kwargs) once and returns {layer: (B, H, Nq, Dv)} head outputs (pre-to_out).

    For ``Patch``: run it on the source input (same timestep and noise as the target, usually).
    A layer called more than once in the pass keeps its last call.
    """
    cache: dict = {}

    def keep(layer: str, out: torch.Tensor):
        cache[layer] = out.detach()

    with session.capture(keep), torch.no_grad():
        forward_fn(*args, **kwargs)
    return cache


def mean_head_outputs(session, forward_fn: Callable, batches: Iterable) -> dict:
    """{layer: (H, Nq, Dv) float32}: each head's pre-to_out output averaged over every image and call.

    Calls forward_fn(batch) for each batch (e.g. a DataLoader of noised images at one timestep;
    call it once per timestep for timestep-specific means). Accumulates in float64.
    """
    sums: dict = {}
    counts: dict = {}

    def add(layer: str, out: torch.Tensor):
        s = out.detach().double().sum(dim=0)
        if layer in sums:
            if sums[layer].shape != s.shape:
                raise ValueError(f"mean_head_outputs: layer {layer!r} changed shape {tuple(sums[layer].shape)} -> "
                                 f"{tuple(s.shape)} between batches (use one image size per call)")
            sums[layer] += s
        else:
            sums[layer] = s
        counts[layer] = counts.get(layer, 0) + out.shape[0]

    with session.capture(add), torch.no_grad():
        for batch in batches:
            forward_fn(batch)
    return {layer: (s / counts[layer]).float() for layer, s in sums.items()}
