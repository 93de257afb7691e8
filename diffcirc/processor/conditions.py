"""``run_conditions``: B images x C intervention conditions as forward passes of up to B * C elements.

Example: every single-head zero ablation of a model, batched::

    conditions = [[]] + [[Zero(layer, h)] for layer, h in session.heads()]   # [] = clean
    with torch.no_grad():
        eps = run_conditions(session, lambda x: unet(x, t).sample, x_t, conditions, max_batch=256)
    eps.shape  # (1 + n_heads, B, C, H, W); eps[0] is the clean prediction

Reuse (the default, under ``torch.no_grad()``): the clean pass runs once and keeps the outputs of
the model's stages (``stage_reuse.StageReuse``: conv_in, the time embedding, each UNet block's
resnets, attentions and down/upsamplers, a transformer's embedders and blocks); conditions are
grouped by the first stage they change, and each group's passes resume there from the stored
outputs, tiled to the pass's batch, instead of recomputing what comes before (a zero ablation in
a UNet's last up block skips conv_in, every down block and the mid block). Each output equals the
condition's own full pass. Where reuse cannot hold (a model whose stages are unknown, gradients
enabled, a capture context open, dropout active) the conditions run as full passes, said once by
a ``stage_reuse.ReuseFallback`` warning.

Condition c of a pass of n occupies elements [c * B, (c + 1) * B) of the forward batch; its
interventions are moved there (an intervention's own ``elements`` index the B images). Inputs
are repeated n times along dim 0 (element e is image e % B), so ``Patch`` caches, the trace's
label map and per-image recorder tags and ids of the B images, all tiled the same way, line up.
Which conditions share a pass depends on the grouping, so per-condition tags are set per pass
through ``on_pass``, which gets the indices of the pass's conditions::

    def tag(indices):  # one value per element of the pass
        recorder.set_tags(condition=[c for c in indices for _ in range(B)], image_ids=ids)
    with session.trace(recorder):
        run_conditions(session, forward, x_t, conditions, on_pass=tag)

A trace open around run_conditions records each condition as its own full pass would, prefix
layers included (replayed from the clean pass); the extra clean pass of reuse records nothing.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Optional, Sequence

import torch

from ..memory import items_that_fit, pass_bytes
from .interventions import Intervention
from .stage_reuse import ReuseFallback, StageReuse, map_tensors, model_stages, tensor_leaves, unreplayed_contexts


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


def reuse_blocker(session) -> Optional[str]:
    """Why run_conditions cannot reuse the clean pass now, or None when it can."""
    if not model_stages(session.model):
        return f"{type(session.model).__name__}'s stages are unknown (no down_blocks, transformer_blocks, ...)"
    if torch.is_grad_enabled():
        return "gradients are enabled (the stored stage outputs carry no graph; use torch.no_grad())"
    if unreplayed_contexts(session):
        return "a capture, heatmaps or other observing context is open (it would miss the skipped layers)"
    return None


class _Passes:
    """The forward passes of one run_conditions call: each runs some of the conditions, n * B elements."""

    def __init__(self, session, forward_fn: Callable, inputs, conditions: list, batch: int, on_pass: Callable):
        self.session, self.forward_fn, self.inputs = session, forward_fn, inputs
        self.conditions, self.batch, self.on_pass = conditions, batch, on_pass
        self.device = tensor_leaves(inputs)[0].device
        self.done: list = []  # (condition indices, output)

    def run(self, indices: list, resume: Optional[StageReuse] = None):
        self.on_pass(list(indices))
        placed = [iv for slot, c in enumerate(indices) for iv in _placed(self.conditions[c], slot, self.batch)]
        tiled = map_tensors(lambda t: _repeat(t, self.batch, len(indices)), self.inputs)
        with self.session.intervene(placed):
            if resume is None:
                out = self.forward_fn(tiled)
            else:
                with resume.resuming():
                    out = self.forward_fn(tiled)
        self.done.append((list(indices), out))
        return out

    def full(self, per_pass: int, max_bytes: Optional[int]) -> None:
        """Every condition in full passes, in the order of conditions."""
        start = 0
        if max_bytes is not None:
            _, cost = pass_bytes(lambda: self.run([0]), self.device)
            start = 1
            per_pass = items_that_fit(cost, max_bytes, cap=per_pass)
        while start < len(self.conditions):
            chunk = list(range(start, min(start + per_pass, len(self.conditions))))
            self.run(chunk)
            start += len(chunk)

    def resumed(self, per_pass: int, max_bytes: Optional[int], strict: bool) -> bool:
        """The clean pass once, then each group of conditions that first change the same stage in
        passes that resume there. False (nothing run but the clean pass) when max_bytes cannot hold
        the stored outputs and one condition."""
        resume = StageReuse(self.session)
        # under the session's processors, as the conditions' passes and their prefixes are
        with self.session.intervene([]), resume.recording():
            if max_bytes is None:
                self.forward_fn(self.inputs)
            else:
                _, cost = pass_bytes(lambda: self.forward_fn(self.inputs), self.device)
        if max_bytes is not None:
            room = max_bytes - resume.nbytes
            if room < cost:
                reason = (f"max_bytes {max_bytes} holds less than the stored stage outputs ({resume.nbytes} bytes) "
                          f"and one condition ({cost} bytes)")
                if strict:
                    raise ValueError(f"run_conditions(reuse=True): {reason}")
                warnings.warn(f"run_conditions: {reason}; running full passes", ReuseFallback, stacklevel=3)
                return False
            per_pass = items_that_fit(cost, room, cap=per_pass)
        groups: dict = {}  # stage calls skipped -> condition indices, in the order of conditions
        for c, cond in enumerate(self.conditions):
            groups.setdefault(resume.resume_index(iv.layer for iv in cond), []).append(c)
        for position in sorted(groups, reverse=True):
            members = groups[position]
            for start in range(0, len(members), per_pass):
                self.run(members[start:start + per_pass], resume)
        return True


def run_conditions(session, forward_fn: Callable, inputs, conditions: Sequence, *, max_batch: Optional[int] = None,
                   max_bytes: Optional[int] = None, reuse: Optional[bool] = None,
                   on_pass: Optional[Callable[[list], None]] = None):
    """Runs forward_fn on inputs under each of C conditions and returns outputs shaped (C, B, ...).

    Args:
        session: the ``Session`` of the model forward_fn runs.
        forward_fn: batch -> output; batch has the structure of inputs with every tensor
            repeated n times along dim 0 (n conditions in this pass); output: a tensor
            (n * B, ...) or a tuple / dict / dataclass of them (non-tensors pass through). With
            reuse the model's inputs must be a function of the batch alone (the same images give
            the same inputs); a pass where they differ from the clean pass's computes everything.
        inputs: a tensor (B, ...) or a tuple / list / dict of them. Tensors whose dim 0 is B are
            repeated; other tensors and values are passed unchanged.
        conditions: C conditions, each an ``Intervention``, a list of them, or [] / None (clean).
        max_batch: at most this many elements per forward pass (>= B).
        max_bytes: memory budget per forward pass: the bytes of one condition are measured on the
            first pass (CUDA: allocator peak; else: sum of module outputs, an upper bound); with
            reuse the stored stage outputs count against it (where they and one condition do not
            fit, full passes, said once).
        reuse: None: reuse the clean pass where possible (C > 1), else full passes, said once by a
            ``ReuseFallback`` warning; True: reuse or raise ValueError; False: full passes.
        on_pass: called before each pass with the indices (into conditions) of the conditions it
            runs, in element order (condition-major); the clean pass reuse adds gets no call.

    Returns:
        The output structure with every tensor (C, B, ...), in the order of conditions.
    """
    conditions = [_as_condition(c) for c in conditions]
    if not conditions:
        raise ValueError("run_conditions needs at least one condition ([] is the clean run)")
    leaves = tensor_leaves(inputs)
    if not leaves:
        raise ValueError("inputs must contain at least one tensor (B, ...)")
    batch = leaves[0].shape[0]
    if max_batch is not None and max_batch < batch:
        raise ValueError(f"max_batch = {max_batch} is smaller than the {batch} images of one condition")
    per_pass = len(conditions) if max_batch is None else max_batch // batch
    passes = _Passes(session, forward_fn, inputs, conditions, batch, on_pass or (lambda indices: None))
    resumed = False
    if reuse or (reuse is None and len(conditions) > 1):  # one condition alone: the clean pass would be extra
        blocker = reuse_blocker(session)
        if blocker is not None and reuse:
            raise ValueError(f"run_conditions(reuse=True): {blocker}")
        if blocker is not None:
            warnings.warn(f"run_conditions: {blocker}; running full passes", ReuseFallback, stacklevel=2)
        else:
            resumed = passes.resumed(per_pass, max_bytes, strict=bool(reuse))
    if not resumed:
        passes.full(per_pass, max_bytes)
    return _in_order(passes.done, batch, len(conditions))


def _repeat(t: torch.Tensor, batch: int, n: int) -> torch.Tensor:
    if t.dim() == 0 or t.shape[0] != batch or n == 1:
        return t
    return t.repeat(n, *([1] * (t.dim() - 1)))


def _in_order(passes: list, batch: int, count: int):
    """The passes' outputs (n * B, ...) as one structure of (C, B, ...) tensors, condition c at index c."""
    order = [c for indices, _ in passes for c in indices]
    if sorted(order) != list(range(count)):
        raise AssertionError(f"run_conditions: passes ran conditions {order}, expected each of 0..{count - 1} once")
    stacked = _stack([map_tensors(lambda t: t.reshape(-1, batch, *t.shape[1:]), out) for _, out in passes])
    if order == list(range(count)):
        return stacked
    inverse = torch.empty(count, dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(count)
    return map_tensors(lambda t: t[inverse.to(t.device)], stacked)


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
