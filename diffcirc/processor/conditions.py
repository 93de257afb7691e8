"""``run_conditions``: B images x C intervention conditions as forward passes of up to B * C elements.

Example: every single-head zero ablation of a model, batched::

    conditions = [[]] + [[Zero(layer, h)] for layer, h in session.heads()]   # [] = clean
    eps = run_conditions(session, lambda x: unet(x, t).sample, x_t, conditions, max_batch=256)
    eps.shape  # (1 + n_heads, B, C, H, W); eps[0] is the clean prediction

Condition c of a chunk of n occupies elements [c * B, (c + 1) * B) of the forward batch; its
interventions are moved there (an intervention's own ``elements`` index the B images). Inputs
are repeated n times along dim 0 (element e is image e % B), so ``Patch`` caches, the trace's
label map and per-image recorder tags and ids of the B images, all tiled the same way, line up.
A tag per condition needs one value per element of the pass::

    recorder.set_tags(condition=[c for c in range(C) for _ in range(B)], image_ids=ids)  # one pass of C * B
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import torch

from .interventions import Intervention


def _map(fn, obj):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):  # e.g. diffusers' UNet2DOutput (a dict too)
        return type(obj)(**{f.name: _map(fn, getattr(obj, f.name)) for f in dataclasses.fields(obj)})
    if isinstance(obj, dict):
        return {k: _map(fn, v) for k, v in obj.items()}
    if hasattr(obj, "_fields"):  # NamedTuple
        return type(obj)(*(_map(fn, v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(fn, v) for v in obj)
    return obj


def _leaves(obj) -> list:
    out = []
    _map(lambda t: out.append(t) or t, obj)
    return out


def _as_condition(cond) -> list:
    if cond is None:
        return []
    if isinstance(cond, Intervention):
        return [cond]
    return list(cond)


def _placed(cond: list, slot: int, batch: int) -> list:
    placed = []
    for iv in cond:
        if iv.elements is None:
            elements = range(slot * batch, (slot + 1) * batch)
        else:
            elements = [slot * batch + int(e) for e in iv.elements]
            if any(not 0 <= int(e) < batch for e in iv.elements):
                raise IndexError(f"intervention on {iv.layer!r}: elements {list(iv.elements)} out of range [0, {batch})")
        placed.append(dataclasses.replace(iv, elements=list(elements)))
    return placed


def _estimate_bytes(session, run: Callable, device: torch.device):
    """(output, bytes per condition) of one pass of a single condition."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = run()
        torch.cuda.synchronize(device)
        return out, max(torch.cuda.max_memory_allocated(device) - base, 1)
    # Elsewhere there is no allocator peak to read: count every module output as if all stayed
    # alive at once, an upper bound of the peak of the pass.
    total = [0]

    def count(module, args, output):
        total[0] += sum(t.numel() * t.element_size() for t in _leaves(output))

    handle = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        out = run()
    finally:
        handle.remove()
    return out, max(total[0], 1)


def run_conditions(session, forward_fn: Callable, inputs, conditions: Sequence, *, max_batch: Optional[int] = None,
                   max_bytes: Optional[int] = None):
    """Runs forward_fn on inputs under each of C conditions and returns outputs shaped (C, B, ...).

    Args:
        session: the ``Session`` of the model forward_fn runs.
        forward_fn: batch -> output; batch has the structure of inputs with every tensor
            repeated n times along dim 0 (n conditions in this pass); output: a tensor
            (n * B, ...) or a tuple / dict / dataclass of them (non-tensors pass through).
        inputs: a tensor (B, ...) or a tuple / list / dict of them. Tensors whose dim 0 is B are
            repeated; other tensors and values are passed unchanged.
        conditions: C conditions, each an ``Intervention``, a list of them, or [] / None (clean).
        max_batch: at most this many elements per forward pass (>= B).
        max_bytes: memory budget per forward pass: the bytes of one condition are measured on the
            first pass (CUDA: allocator peak; else: sum of module outputs, an upper bound).

    Returns:
        The output structure with every tensor (C, B, ...).
    """
    conditions = [_as_condition(c) for c in conditions]
    if not conditions:
        raise ValueError("run_conditions needs at least one condition ([] is the clean run)")
    leaves = _leaves(inputs)
    if not leaves:
        raise ValueError("inputs must contain at least one tensor (B, ...)")
    batch = leaves[0].shape[0]
    if max_batch is not None and max_batch < batch:
        raise ValueError(f"max_batch = {max_batch} is smaller than the {batch} images of one condition")

    def repeat(t: torch.Tensor, n: int) -> torch.Tensor:
        if t.dim() == 0 or t.shape[0] != batch or n == 1:
            return t
        return t.repeat(n, *([1] * (t.dim() - 1)))

    def run(chunk: list):
        placed = [iv for slot, cond in enumerate(chunk) for iv in _placed(cond, slot, batch)]
        with session.intervene(placed):
            return forward_fn(_map(lambda t: repeat(t, len(chunk)), inputs))

    per_pass = len(conditions) if max_batch is None else max_batch // batch
    outputs = []
    start = 0
    if max_bytes is not None:
        out, cost = _estimate_bytes(session, lambda: run(conditions[:1]), leaves[0].device)
        outputs.append(out)
        start = 1
        per_pass = min(per_pass, max(1, int(max_bytes // cost)))
    while start < len(conditions):
        chunk = conditions[start:start + per_pass]
        outputs.append(run(chunk))
        start += len(chunk)

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, batch, *t.shape[1:])

    pieces = [_map(split, out) for out in outputs]
    return _stack(pieces)


def _stack(pieces: list):
    first = pieces[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(pieces, dim=0)
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        return type(first)(**{f.name: _stack([getattr(p, f.name) for p in pieces]) for f in dataclasses.fields(first)})
    if isinstance(first, dict):
        return {k: _stack([p[k] for p in pieces]) for k in first}
    if hasattr(first, "_fields"):
        return type(first)(*(_stack([p[i] for p in pieces]) for i in range(len(first))))
    if isinstance(first, (list, tuple)):
        return type(first)(_stack([p[i] for p in pieces]) for i in range(len(first)))
    return first
