"""``StageReuse``: one clean forward pass, kept stage by stage, from which later passes resume.

Everything a forward pass computes before its first intervened layer is the clean computation
again (and in a UNet so are the skip connections made before it). ``StageReuse`` runs the clean
pass once, keeps the outputs of the model's top-level stages (``model_stages``: for a UNet
``conv_in``, the time embedding, each down block's hidden state and residuals, the mid block, each
up block; for a transformer the embedders and each block), and lets a later pass return those
outputs, tiled to its batch, instead of computing them::

    reuse = StageReuse(session)
    with torch.no_grad():
        with reuse.recording():                          # the clean pass, B images
            clean = unet(x, t).sample
        with session.intervene([Zero("up_blocks.0.attentions.1", 3)]), reuse.resuming():
            eps = unet(x, t).sample                      # conv_in .. down blocks .. mid block: stored outputs
        reuse.last_skipped                               # stage calls this pass did not compute

How a pass resumes. During the clean pass each stage module's forward is wrapped (an instance
attribute, removed in ``finally``; diffusers' classes are not touched) and every stage call and the
first call of every attention layer are put in call order. A resumed pass, inside ``resuming()``,
decides at the model's forward pre-hook where it may resume: before the first call of any layer
that an open ``intervene`` or ``gate`` context addresses (the conditions' own interventions and any
outer ones) or that one addressed while the clean pass was recorded (its stored outputs past that
layer carry the change); the stage calls made before that point return their stored outputs. The rest, the
model's own glue code between stages included, runs as usual on the pass's inputs. So the order
and the model's structure are those diffusers' forward has; nothing about residual tuples or block
signatures is assumed beyond "a stage's output depends only on what ran before it".

The stored outputs are keyed by the clean pass's inputs: each model call of a resumed pass must
get the clean call's inputs, every tensor whose dim 0 is the clean batch B repeated n times along
dim 0 (n copies) and the others equal. Any difference (another x_t, timestep, text, or a
``forward_fn`` that is not a function of its batch alone) makes that call compute everything, and
says so once (a ``ReuseFallback`` warning); so does a pass with gradients enabled (stored outputs
carry no graph), one where a context other than trace / intervene / gate is open (``capture`` and
token heatmaps see every layer), or one whose traces differ from those of the clean pass.

Traces. The clean pass records nothing into the traces open during it: it is the reference the
resumed passes read from, not one of the conditions. It keeps each traced layer call's values; a
resumed pass that skips a stage call hands the recorders the values of the layer calls inside it,
tiled to the pass's batch, under the tags set for that pass. So a recorder open around a resumed
pass ends with what the same pass computed in full would have given it: every layer once per
element, prefix layers included.

A skipped stage's own forward hooks run (they see its stored output); those of the modules inside
it do not, since nothing inside it runs.

Memory: ``nbytes`` (the stored outputs and traced values, for B images) stays allocated while the
object lives; a resumed pass of n copies also holds the n-fold tiled outputs of the stages it
skipped, as its full counterpart would hold their computed outputs.
"""

from __future__ import annotations

import dataclasses
import warnings
from contextlib import contextmanager
from typing import Optional

import torch

# Attributes of diffusers models that hold their top-level stages, in no particular order (the
# order used is the one the clean pass calls them in). A ModuleList contributes each element.
STAGE_ATTRIBUTES = (
    "conv_in", "time_embedding", "class_embedding", "add_embedding",  # UNet2DModel, UNet2DConditionModel
    "down_blocks", "mid_block", "up_blocks",
    "x_embedder", "context_embedder", "time_text_embed",  # SD3, Flux, ... transformers
    "transformer_blocks", "joint_transformer_blocks", "single_transformer_blocks",
)
# a model is known when it has at least one of these block lists: the stages where the cost lies
BLOCK_LISTS = ("down_blocks", "up_blocks", "transformer_blocks", "joint_transformer_blocks",
               "single_transformer_blocks")
UNET_BLOCKS = ("down_blocks", "mid_block", "up_blocks")
BLOCK_PARTS = ("resnets", "attentions", "downsamplers", "upsamplers")  # the layers a diffusers UNet block calls


class ReuseFallback(UserWarning):
    """A pass computed stages it could have reused, and why (shown once per reason)."""


def model_stages(model: torch.nn.Module) -> list:
    """[(module path, module)] of the model's top-level stages; [] when it has none of BLOCK_LISTS
    (a model whose stages this module does not know)."""
    if not any(isinstance(getattr(model, name, None), torch.nn.ModuleList) for name in BLOCK_LISTS):
        return []
    stages = []
    for name in STAGE_ATTRIBUTES:
        value = getattr(model, name, None)
        if isinstance(value, torch.nn.ModuleList):
            stages += [(f"{name}.{i}", m) for i, m in enumerate(value)]
        elif isinstance(value, torch.nn.Module):
            stages.append((name, value))
    return stages


def stage_units(model: torch.nn.Module) -> list:
    """``model_stages`` with each UNet block (down_blocks.i, mid_block, up_blocks.i) split into the
    layers it calls in turn (BLOCK_PARTS: resnets.j, attentions.j, downsamplers.0, upsamplers.0); the
    block's own code between them (residual tuples, concatenations) still runs. A condition in a
    block's last attention then skips the block's first layers too. Blocks without such parts stay whole."""
    units = []
    for name, stage in model_stages(model):
        parts = [(f"{name}.{attr}.{i}", m) for attr in BLOCK_PARTS
                 if isinstance(getattr(stage, attr, None), torch.nn.ModuleList)
                 for i, m in enumerate(getattr(stage, attr))]
        units += parts if parts and name.split(".")[0] in UNET_BLOCKS else [(name, stage)]
    return units


def map_tensors(fn, obj):
    """obj with fn applied to every tensor in it: tensors, tuples, lists, dicts, NamedTuples and
    dataclasses (diffusers' outputs) nest; other values pass through."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):  # e.g. diffusers' UNet2DOutput (a dict too)
        return type(obj)(**{f.name: map_tensors(fn, getattr(obj, f.name)) for f in dataclasses.fields(obj)})
    if isinstance(obj, dict):
        return {k: map_tensors(fn, v) for k, v in obj.items()}
    if hasattr(obj, "_fields"):  # NamedTuple
        return type(obj)(*(map_tensors(fn, v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(fn, v) for v in obj)
    return obj


def tensor_leaves(obj) -> list:
    """The tensors in obj, in map_tensors' order."""
    out = []
    map_tensors(lambda t: out.append(t) or t, obj)
    return out


def _fallback(reason: str) -> None:
    warnings.warn(f"stage reuse: {reason}; this pass computes the stages it could have reused", ReuseFallback,
                  stacklevel=2)


@dataclasses.dataclass
class _StageCall:
    """One stage call of the clean pass: its output (B images, cloned), whether every tensor in it
    has dim 0 = B (only then can it be tiled), the traced layer calls inside it and the session's
    joint-text length after it."""

    name: str
    output: object
    tileable: bool
    traced: list = dataclasses.field(default_factory=list)  # [(recorder, layer, n_keys, grid, values)]
    text_tokens: Optional[int] = None


@dataclasses.dataclass
class _ModelCall:
    """One call of the model in the clean pass: its inputs (cloned) and batch."""

    args: tuple
    kwargs: dict
    batch: int


class StageReuse:
    """The clean pass of a session's model, kept stage by stage; see the module docstring.

    Args:
        session: the ``Session`` of the model (its ``model`` is the one whose stages are kept).
        stages: [(module path, module)] to keep instead of ``stage_units(session.model)`` (UNet blocks
            split into their layers; ``model_stages`` keeps them whole); they must not nest, and each
            output must depend only on what ran before it in the pass.

    Raises ValueError for a model without known stages (pass ``stages``, or run full passes).
    """

    def __init__(self, session, stages: Optional[list] = None):
        self.session = session
        self.model = session.model
        self.stages = list(stage_units(self.model) if stages is None else stages)
        if not self.stages:
            raise ValueError(
                f"stage reuse: {type(self.model).__name__} has none of the stage lists "
                f"{', '.join(BLOCK_LISTS)}; its stages are unknown (pass stages=[(path, module)], or run full passes)")
        self._calls: list = []  # [_StageCall] of the clean pass, in call order
        self._model_calls: list = []  # [_ModelCall]
        self._first_call: dict = {}  # layer -> stage calls completed before its first call
        self._recorded_changes: set = set()  # layers intervened on or gated in the clean pass
        self._traces: list = []  # (recorder, labels) of the traces open in the clean pass
        self._mode = None  # "record" | "resume" while a context is open
        self._recorded = self._recorded_with_dropout = False
        self.last_skipped = 0  # stage calls the last resumed pass returned from the store

    # ---- what is kept ------------------------------------------------------------------------
    @property
    def stage_calls(self) -> list:
        """Names of the clean pass's stage calls, in call order."""
        return [c.name for c in self._calls]

    @property
    def nbytes(self) -> int:
        """Bytes of the stored stage outputs and traced values (for the clean pass's B images)."""
        seen: dict = {}
        for call in self._calls:
            for t in tensor_leaves(call.output) + [v for *_, values in call.traced for v in values.values()]:
                seen[id(t)] = t.numel() * t.element_size()
        return sum(seen.values())

    def resume_index(self, layers) -> int:
        """How many stage calls a pass may skip when layers (module paths) are changed: those that
        end before the first call of any of them or of a layer changed in the clean pass
        (len(stage_calls) when none is called)."""
        self._require_recorded()
        changed = set(layers) | self._recorded_changes
        return min([self._first_call[name] for name in changed if name in self._first_call], default=len(self._calls))

    def _require_recorded(self):
        if not self._recorded:
            raise RuntimeError("stage reuse: no clean pass recorded yet (run one inside reuse.recording())")

    # ---- the clean pass ------------------------------------------------------------------------
    @contextmanager
    def recording(self):
        """The forward passes in the block (one call of forward_fn; the model may be called more
        than once) are the clean computation: stage outputs and layer order are kept, replacing
        what an earlier recording kept. Open traces record nothing in it (see the module docstring)."""
        if self._mode is not None:
            raise RuntimeError("stage reuse: recording() and resuming() do not nest")
        self._calls, self._model_calls, self._first_call, self._traces = [], [], {}, []
        self._recorded_changes = set()
        self._recorded = self._recorded_with_dropout = False
        self._memo: dict = {}  # id(output tensor) -> (tensor, clone): keeps aliasing, and ids alive
        self._open: Optional[_StageCall] = None
        intercepted: dict = {}  # id(recorder) -> (recorder, had its own record attribute, that attribute)
        handles = [self.model.register_forward_pre_hook(self._record_model_call, with_kwargs=True)]
        for name in self.session.layer_names:
            handles.append(self.model.get_submodule(name).register_forward_pre_hook(self._layer_seen(name)))
        self._intercepted = intercepted
        self._mode = "record"
        try:
            with self._wrapped():
                yield self
            self._recorded = True
        finally:
            self._mode = None
            for h in handles:
                h.remove()
            for recorder, had, attr in intercepted.values():
                if had:
                    recorder.record = attr
                else:
                    del recorder.record
            self._memo, self._open, self._intercepted = {}, None, {}

    def _layer_seen(self, name: str):
        def hook(module, args):
            self._first_call.setdefault(name, len(self._calls))  # the open stage call is not among them yet
        return hook

    def _record_model_call(self, module, args, kwargs):
        batch = _batch_of(args, kwargs)
        if self._model_calls and batch != self._model_calls[0].batch:
            raise ValueError(f"stage reuse: the model was called with batches {self._model_calls[0].batch} and "
                             f"{batch} in one clean pass")
        clone = lambda t: t.detach().clone()  # noqa: E731
        self._model_calls.append(_ModelCall(map_tensors(clone, args), map_tensors(clone, kwargs), batch))
        self._recorded_with_dropout = self._recorded_with_dropout or _dropout_active(self.model)
        self._recorded_changes |= _changed_layers(self.session)
        traces = _open_traces(self.session)
        if len(self._model_calls) == 1:
            self._traces = [(t.recorder, t.labels) for t in traces]
        for trace in traces:
            self._intercept(trace.recorder)

    def _intercept(self, recorder):
        """Replace recorder.record (on the instance, until recording ends) by one that keeps the
        values of layer calls inside a stage and records nothing."""
        if id(recorder) in self._intercepted:
            return
        had = "record" in vars(recorder)
        self._intercepted[id(recorder)] = (recorder, had, vars(recorder).get("record"))

        def record(layer, n_keys, grid, values):
            if self._open is not None:
                kept = {stat: v.detach() for stat, v in values.items()}
                self._open.traced.append((recorder, layer, n_keys, grid, kept))

        recorder.record = record

    # ---- resumed passes ------------------------------------------------------------------------
    @contextmanager
    def resuming(self):
        """Forward passes in the block skip the stage calls they can (``last_skipped`` counts them, per
        call of the block's forward_fn: counting restarts each time the context is entered)."""
        self._require_recorded()
        if self._mode is not None:
            raise RuntimeError("stage reuse: recording() and resuming() do not nest")
        self._position = 0  # stage calls made so far in this pass
        self._model_call = 0
        self._skip_until = len(self._calls)
        self._copies = 1
        self._tiled: dict = {}  # id(stored tensor) -> its tiled copy, one per pass (keeps aliasing)
        self.last_skipped = 0
        handle = self.model.register_forward_pre_hook(self._resume_model_call, with_kwargs=True)
        self._mode = "resume"
        try:
            with self._wrapped():
                yield self
        finally:
            self._mode = None
            handle.remove()
            self._tiled = {}

    def _resume_model_call(self, module, args, kwargs):
        index = self._model_call
        self._model_call += 1
        reason = None
        if index >= len(self._model_calls):
            reason = f"the model was called {index + 1} times, the clean pass called it {len(self._model_calls)}"
        else:
            clean = self._model_calls[index]
            copies = _copies_of(clean, args, kwargs)
            if copies is None:
                reason = "the model's inputs differ from the clean pass's (tiled)"
            elif index == 0:
                self._copies = copies
            elif copies != self._copies:
                reason = "the model's calls in this pass have different batches"
        reason = reason or self._context_reason()
        if reason is not None:
            self._skip_until = min(self._skip_until, self._position)
            _fallback(reason)
            return
        self._skip_until = min(self._skip_until, self.resume_index(_changed_layers(self.session)))

    def _context_reason(self) -> Optional[str]:
        """Why the contexts open now keep this pass from reusing anything, or None."""
        if torch.is_grad_enabled():
            return "gradients are enabled (stored outputs carry no graph; use torch.no_grad())"
        if self._recorded_with_dropout or _dropout_active(self.model):
            return "dropout is active (the model is in training mode): no two passes are the same"
        if unreplayed_contexts(self.session):
            return "a capture, heatmaps or other observing context is open (it would miss the skipped layers)"
        now = [(t.recorder, t.labels) for t in _open_traces(self.session)]
        if not _same_traces(now, self._traces):
            return "the open traces (recorders or label maps) differ from those of the clean pass"
        return None

    # ---- stage wrappers ------------------------------------------------------------------------
    @contextmanager
    def _wrapped(self):
        saved = []
        try:
            for name, module in self.stages:
                had = "forward" in vars(module)
                saved.append((module, had, vars(module).get("forward")))
                module.forward = self._stage_forward(name, module.forward)
            yield
        finally:
            for module, had, attr in reversed(saved):
                if had:
                    module.forward = attr
                else:
                    del module.forward

    def _stage_forward(self, name: str, forward):
        def run(*args, **kwargs):
            if self._mode == "record":
                return self._record_stage(name, forward, args, kwargs)
            if self._mode == "resume":
                return self._resume_stage(name, forward, args, kwargs)
            return forward(*args, **kwargs)
        return run

    def _record_stage(self, name, forward, args, kwargs):
        if self._open is not None:
            raise ValueError(f"stage reuse: stage {name} runs inside stage {self._open.name}; stages must not nest")
        call = _StageCall(name, None, False)
        self._open = call
        try:
            out = forward(*args, **kwargs)
        finally:
            self._open = None
        batch = self._model_calls[-1].batch if self._model_calls else None
        leaves = tensor_leaves(out)
        call.tileable = batch is not None and all(t.dim() > 0 and t.shape[0] == batch for t in leaves)
        call.output = map_tensors(self._clone, out)  # a copy: the model's glue may change its output in place
        call.text_tokens = getattr(self.session, "_text_tokens", None)
        self._calls.append(call)
        return out

    def _clone(self, t: torch.Tensor) -> torch.Tensor:
        if id(t) not in self._memo:
            self._memo[id(t)] = (t, t.detach().clone())
        return self._memo[id(t)][1]

    def _resume_stage(self, name, forward, args, kwargs):
        position = self._position
        self._position += 1
        call = self._calls[position] if position < len(self._calls) else None
        if call is None or call.name != name:  # another control flow than the clean pass's: stop reusing
            if position < self._skip_until:
                _fallback("the stages are called in another order than in the clean pass")
            self._skip_until = min(self._skip_until, position)
            return forward(*args, **kwargs)
        if position >= self._skip_until or not call.tileable:
            return forward(*args, **kwargs)
        self.last_skipped += 1
        for recorder, layer, n_keys, grid, values in call.traced:
            recorder.record(layer, n_keys, grid, {stat: self._tile(v) for stat, v in values.items()})
        if hasattr(self.session, "_text_tokens"):
            # the text length a Flux / AuraFlow single-stream layer reads from the last two-stream
            # layer of the pass, which this pass did not run
            self.session._text_tokens = call.text_tokens
        return map_tensors(self._tile, call.output)

    def _tile(self, t: torch.Tensor) -> torch.Tensor:
        if id(t) not in self._tiled:
            batch = self._model_calls[0].batch
            if t.dim() > 0 and t.shape[0] == batch:
                self._tiled[id(t)] = t.repeat(self._copies, *([1] * (t.dim() - 1)))
            else:
                self._tiled[id(t)] = t.clone()
        return self._tiled[id(t)]


def _dropout_active(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.training and m.p > 0 for m in model.modules())


# ---- the model's inputs ------------------------------------------------------------------------

def _batch_of(args, kwargs) -> Optional[int]:
    """The model call's batch: dim 0 of its sample (the first positional argument, or ``sample`` /
    ``hidden_states``), else of its first tensor."""
    x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
    if not isinstance(x, torch.Tensor):
        leaves = tensor_leaves((args, kwargs))
        x = leaves[0] if leaves else None
    return int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() > 0 else None


def _copies_of(clean: _ModelCall, args, kwargs) -> Optional[int]:
    """n when (args, kwargs) are the clean call's inputs with every tensor whose dim 0 is the clean
    batch repeated n times along dim 0 and everything else equal; else None."""
    got, want = _flatten((args, kwargs)), _flatten((clean.args, clean.kwargs))
    if [path for path, _ in got] != [path for path, _ in want]:
        return None
    copies = set()
    for (_, g), (_, w) in zip(got, want):
        if not isinstance(w, torch.Tensor):
            if isinstance(g, torch.Tensor) or not _equal_values(g, w):
                return None
        elif not isinstance(g, torch.Tensor) or g.dtype != w.dtype:
            return None
        elif w.dim() > 0 and w.shape[0] == clean.batch:
            n, rest = divmod(g.shape[0], clean.batch) if g.dim() > 0 else (0, 1)
            if rest or n == 0 or g.shape[1:] != w.shape[1:]:
                return None
            if not torch.equal(g.view(n, *w.shape), w.to(g.device).expand(n, *w.shape)):
                return None
            copies.add(n)
        elif g.shape != w.shape or not torch.equal(g, w.to(g.device)):
            return None
    if len(copies) > 1:
        return None
    return copies.pop() if copies else 1


def _flatten(obj, path=()) -> list:
    """[(path, leaf)]: the leaves of nested tuples / lists / dicts with where they sit."""
    if isinstance(obj, dict):
        return [item for k in obj for item in _flatten(obj[k], path + (k,))]
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return [(path + ("len", len(obj)), None)] + [item for i, v in enumerate(obj) for item in _flatten(v, path + (i,))]
    return [(path, obj)]


def _equal_values(a, b) -> bool:
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:  # values without a plain truth value: compare identities
        return a is b


# ---- the session's open contexts ----------------------------------------------------------------
# Session has no public view of its open contexts; these read its context stacks and fail loudly if
# their shape changes (a silent misreading would resume past an intervention).

def _stack(session, name: str) -> list:
    stack = getattr(session, name, None)
    if not isinstance(stack, list):
        raise RuntimeError(f"stage reuse: Session.{name} is not the context stack this module reads; "
                           "update diffcirc.processor.stage_reuse")
    return stack


def _open_traces(session) -> list:
    return list(_stack(session, "_traces"))


def _changed_layers(session) -> set:
    """Layers an open intervene or gate context addresses."""
    layers = set()
    for by_layer in _stack(session, "_interventions"):
        layers.update(by_layer)
    for gates, _ in _stack(session, "_gates"):
        layers.update(gates)
    return layers


def unreplayed_contexts(session) -> int:
    """Open contexts other than trace, intervene and gate (capture, heatmaps, ...): each one pushes a
    level of the session's install depth."""
    known = sum(len(_stack(session, name)) for name in ("_traces", "_interventions", "_gates"))
    return int(getattr(session, "_depth")) - known


def _same_traces(now: list, clean: list) -> bool:
    if len(now) != len(clean):
        return False
    remaining = list(clean)
    for recorder, labels in now:
        match = next((i for i, (r, lab) in enumerate(remaining) if r is recorder and _same_labels(labels, lab)), None)
        if match is None:
            return False
        remaining.pop(match)
    return True


def _same_labels(a, b) -> bool:
    if a is b:
        return True
    return a is not None and b is not None and a.shape == b.shape and torch.equal(a, b.to(a.device))
