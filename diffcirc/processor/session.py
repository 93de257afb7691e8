"""``Session``: a diffusers model's attention layers, and contexts that trace and intervene on them.

    session = Session(unet)                 # UNet2DModel, UNet2DConditionModel, Transformer2DModel, ...
    session.layers                          # [LayerInfo(name, kind, heads, head_dim, grid), ...]
    with session.trace(recorder, labels=part_masks), session.intervene([Zero("mid_block.attentions.0", 2)]):
        unet(x, t)

Attention modules are found by class (``supported.ATTENTION_MODULES``). Each layer's processor
must have a fused counterpart (``supported.FUSED_COUNTERPARTS``); ``Session(model)`` refuses a
model with any other processor, naming the layers, before any forward pass, since replacing it
would silently change the output. ``Session(model, unsupported="skip")`` leaves such layers on
their own processors instead and lists them in ``session.skipped``; addressing one raises.

Each context installs the counterparts (with this session as their controller) through
``set_processor`` (UNet2DModel has no ``set_attn_processor``) when the first context opens, and
puts back the previous processors when the last one closes, also when the body raises. Contexts
nest in any order.

Token grids: a layer fed a 4-D feature map (B, C, h, w) has grid (h, w). A layer fed 3-D tokens
(transformer blocks) gets its grid from the model input (H, W) (the first positional argument,
or ``sample`` / ``hidden_states``, seen by a forward pre-hook; else ``config.sample_size``) by
the rule of ``grid.infer_grid``: the power-of-two down-sampling (ceil(H / 2^k), ceil(W / 2^k))
with h * w = N; if none fits, statistics that need the grid raise ValueError. A model given
``img_ids`` (Flux: packed latents, ids (N, 3) of (0, row, col)) has the grid those ids span.

Joint layers (SD3, Flux, AuraFlow: image and text tokens in one softmax, kind "joint") record
their image-token queries under the layer's name, with entropy over all keys and distance and
label mass over the image keys (the softmax restricted to them, as in a UNet's self-attention;
a second, statistics-only op call over the image tokens, made only when those are recorded),
and their text-token queries' entropy under ``LayerInfo.text_name`` (``name + ":text"``). A
single-stream block (Flux, AuraFlow) gets the sequence already joined, text first; its text
length is that of the last two-stream joint layer in the same forward pass. Interventions and
attribution act on a head for all of a joint layer's queries, image and text.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .grid import infer_grid, labels_to_grid, sample_size_hw, tile_batch
from .heatmaps import TokenHeatmaps
from .interventions import Intervention, head_arguments
from .processor import AttentionCall, OpRequest
from .recorder import Recorder
from .supported import attention_modules, counterpart, describe_unsupported, supported_names, unsupported_layers

UNSUPPORTED_CHOICES = ("refuse", "skip")
TEXT_QUERIES = ":text"  # suffix of the recorder name of a joint layer's text-token queries
_IMAGE_KEY_STATS = {"distance", "label_mass"}  # on joint layers: over image queries and keys only


@dataclass
class LayerInfo:
    """name: module path; kind: "self" | "cross" | "joint"; grid: (h, w) of the (image) queries, None
    until seen; text_tokens: a joint layer's number of text tokens, None until seen."""

    name: str
    kind: str
    heads: int
    head_dim: int
    grid: Optional[tuple] = None
    text_tokens: Optional[int] = None

    @property
    def text_name(self) -> Optional[str]:
        """The recorder name of a joint layer's text-token queries, None for other kinds."""
        return self.name + TEXT_QUERIES if self.kind == "joint" else None


@dataclass(frozen=True)
class SkippedLayer:
    """An attention layer left on its own processor (``Session(model, unsupported="skip")``), untraced."""

    name: str
    processor_class: type


class _Trace:
    def __init__(self, recorder: Recorder, labels: Optional[torch.Tensor]):
        self.recorder = recorder
        self.labels = labels
        self.token_labels: dict = {}  # (grid, batch) -> (B, N) int32 (the op's dtype), computed once per shape


class Session:
    """Attention layers of a diffusers model, with ``trace``, ``intervene``, ``capture`` and ``gate`` contexts."""

    def __init__(self, model: torch.nn.Module, unsupported: str = "refuse"):
        """unsupported: "refuse" (ValueError when a layer's processor has no fused counterpart) or
        "skip" (leave those layers on their own processors, listed in ``skipped``)."""
        if unsupported not in UNSUPPORTED_CHOICES:
            raise ValueError(f"unsupported must be one of {UNSUPPORTED_CHOICES}, got {unsupported!r}")
        self.model = model
        owner = type(model).__name__
        modules = attention_modules(model)
        if not modules:
            raise ValueError(f"{owner} has no diffusers attention modules (Attention or AttentionModuleMixin)")
        refused = unsupported_layers(modules)
        if refused and unsupported == "refuse":
            raise ValueError(_refusal(owner, refused) + " Pass unsupported='skip' to leave these layers on their "
                             "own processors, untraced.")
        self.skipped = [SkippedLayer(name, cls) for name, cls in refused.items()]
        self._modules = {name: m for name, m in modules.items() if name not in refused}
        if not self._modules:
            raise ValueError(_refusal(owner, refused) + " Every layer would be skipped: nothing to trace.")
        self.layers = [LayerInfo(name, counterpart(m.processor).kind(m), m.heads, m.inner_dim // m.heads)
                       for name, m in self._modules.items()]
        self._info = {info.name: info for info in self.layers}
        self._depth = 0
        self._saved: dict = {}
        self._hook = None
        self._input_hw = None
        self._img_ids = None  # the model input's img_ids (Flux), read for its grid when a grid is needed
        self._ids_grid = None
        self._text_tokens = None  # text length of the last two-stream joint layer in this forward pass
        self._grid_cache: dict = {}
        self._traces: list = []
        self._interventions: list = []  # one list per open intervene context
        self._captures: list = []
        self._gates: list = []  # (gates {layer: (H,)}, baseline mapping or None)
        self._heatmaps: list = []
        self._key_groups: dict = {}  # (Nk, image span, batch, device) -> (B, Nk) int32 text-token groups

    # ---- addressing --------------------------------------------------------------------------
    @property
    def layer_names(self) -> list:
        return [info.name for info in self.layers]

    def layer(self, name: str) -> LayerInfo:
        if name not in self._info:
            skipped = next((s for s in self.skipped if s.name == name), None)
            if skipped is not None:
                raise ValueError(
                    f"layer {name!r} was skipped: its processor {skipped.processor_class.__name__} has no fused "
                    "counterpart, so it cannot be traced or intervened on")
            raise KeyError(f"no attention layer {name!r}; layers: {self.layer_names}")
        return self._info[name]

    def heads(self) -> list:
        """Every (layer name, head index)."""
        return [(info.name, h) for info in self.layers for h in range(info.heads)]

    # ---- contexts ------------------------------------------------------------------------------
    @contextmanager
    def _installed(self):
        if self._depth == 0:
            changed = unsupported_layers(self._modules)  # a processor set after the session was made
            if changed:
                raise ValueError(_refusal(type(self.model).__name__, changed)
                                 + " The processors changed after the Session was made; make a new Session.")
            self._saved = {name: m.processor for name, m in self._modules.items()}
            try:
                self._hook = self.model.register_forward_pre_hook(self._see_input, with_kwargs=True)
                for name, m in self._modules.items():
                    m.set_processor(counterpart(m.processor).build(name, self, m.processor))
            except BaseException:
                self._restore()
                raise
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._restore()

    def _restore(self):
        for name, processor in self._saved.items():
            self._modules[name].set_processor(processor)
        self._saved = {}
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    @contextmanager
    def _pushed(self, stack: list, entry):
        with self._installed():
            stack.append(entry)
            try:
                yield
            finally:
                stack[:] = [e for e in stack if e is not entry]

    @contextmanager
    def trace(self, recorder: Recorder, labels: Optional[torch.Tensor] = None):
        """Record statistics into recorder for every forward pass in the block.

        labels: (B, S_h, S_w) integer region ids at image resolution for label_mass, resampled to
        each self-attention layer's grid by ``grid.labels_to_grid`` (nearest, token centres); B
        may divide the forward batch (tiled). Yields the recorder.
        """
        if labels is not None:
            if not isinstance(labels, torch.Tensor) or labels.dim() != 3 or labels.is_floating_point():
                raise ValueError(f"labels must be an integer tensor (B, S_h, S_w), got {getattr(labels, 'shape', labels)}")
            others = [t.labels for t in self._traces if t.labels is not None]
            if any(o is not labels for o in others):
                raise ValueError("nested traces must share one label map (the op takes one set of labels per call)")
        for name in sorted((recorder.maps or {}).get("layers") or ()):
            # maps of a skipped or unknown layer would stay empty: refuse them here
            self.layer(name[:-len(TEXT_QUERIES)] if name.endswith(TEXT_QUERIES) else name)
        entry = _Trace(recorder, labels)
        with self._pushed(self._traces, entry):
            yield recorder

    @contextmanager
    def intervene(self, interventions):
        """Apply interventions (an ``Intervention`` or a sequence of them) to every forward pass in the block."""
        if isinstance(interventions, Intervention):
            interventions = [interventions]
        interventions = list(interventions)
        by_layer: dict = {}
        for iv in interventions:
            if not isinstance(iv, Intervention):
                raise TypeError(f"intervene expects Intervention objects (Zero, Scale, ...), got {type(iv).__name__}")
            self.layer(iv.layer)  # unknown names fail here, not in the middle of a forward pass
            by_layer.setdefault(iv.layer, []).append(iv)
        with self._pushed(self._interventions, by_layer):
            yield

    @contextmanager
    def heatmaps(self, maps: TokenHeatmaps):
        """Add every cross and joint layer's attention on each text token into maps (``TokenHeatmaps``).

        Each image query's mass on text token j comes from the op's key-group mass with one group
        per text token (cross: every key; joint: the non-image tokens), never from a map. Yields maps.
        """
        if not isinstance(maps, TokenHeatmaps):
            raise TypeError(f"heatmaps expects a TokenHeatmaps, got {type(maps).__name__}")
        for name in sorted(maps.layers or ()):
            if self.layer(name).kind not in ("cross", "joint"):
                raise ValueError(f"layer {name!r} is {self.layer(name).kind}-attention: token heatmaps come from "
                                 "cross and joint layers only")
        with self._pushed(self._heatmaps, maps):
            yield maps

    @contextmanager
    def capture(self, callback: Callable[[str, torch.Tensor], None]):
        """Call callback(layer, out) with each layer's head outputs out (B, H, Nq, Dv) (pre-to_out, after interventions)."""
        with self._pushed(self._captures, callback):
            yield

    @contextmanager
    def gate(self, gates: dict, baseline: Optional[dict] = None):
        """Multiply head outputs by gates {layer: (H,) tensor} (on top of Zero/Scale interventions),
        mixing in baseline {layer: (H, Nq, Dv) or (Bc, H, Nq, Dv)} as out = g*attn + (1-g)*baseline
        (0 when None). Used by ``head_attribution``."""
        for layer in gates:
            self.layer(layer)
        with self._pushed(self._gates, (gates, baseline)):
            yield

    # ---- controller protocol (called by FusedAttnProcessor) ------------------------------------
    def _see_input(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        if isinstance(x, torch.Tensor) and x.dim() == 4:
            self._input_hw = (int(x.shape[-2]), int(x.shape[-1]))
        ids = kwargs.get("img_ids")
        if ids is None and len(args) > self._img_ids_position():
            ids = args[self._img_ids_position()]
        if ids is not self._img_ids:
            self._img_ids, self._ids_grid = ids if isinstance(ids, torch.Tensor) else None, None
        self._text_tokens = None

    def _img_ids_position(self) -> int:
        """Index of img_ids among the model's positional parameters (Flux: 4), or a large number."""
        if not hasattr(self, "_ids_position"):
            names = list(inspect.signature(self.model.forward).parameters)
            self._ids_position = names.index("img_ids") if "img_ids" in names else 1 << 30
        return self._ids_position

    def _grid_of_ids(self) -> Optional[tuple]:
        """(rows, cols) spanned by the model input's img_ids (..., N, 3) = (0, row, col), or None."""
        if self._img_ids is None:
            return None
        if self._ids_grid is None:
            ids = self._img_ids.reshape(-1, self._img_ids.shape[-1])
            self._ids_grid = (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)
        return self._ids_grid

    def _image_span(self, call: AttentionCall) -> Optional[tuple]:
        """(start, stop) of a joint call's image tokens: the call's own, or after the text of the pass."""
        if call.image_span is not None:
            self._text_tokens = call.n_queries - (call.image_span[1] - call.image_span[0])
            return tuple(call.image_span)
        if self._text_tokens is None or self._text_tokens > call.n_queries:
            return None
        return self._text_tokens, call.n_queries

    def _grid(self, info: LayerInfo, call: AttentionCall, required: bool, n_tokens: int):
        if call.spatial is not None:
            info.grid = tuple(call.spatial)
            return info.grid
        ids_grid = self._grid_of_ids() if self._img_ids is not None else None
        if ids_grid is not None and ids_grid[0] * ids_grid[1] == n_tokens:
            info.grid = ids_grid
            return ids_grid
        hw = self._input_hw or sample_size_hw(getattr(self.model, "config", None))
        key = (n_tokens, hw)
        if key not in self._grid_cache:
            try:
                self._grid_cache[key] = infer_grid(n_tokens, hw, info.name)
            except ValueError as err:
                self._grid_cache[key] = err
        grid = self._grid_cache[key]
        if isinstance(grid, ValueError):
            if required:
                raise grid
            return None
        info.grid = grid
        return grid

    def _stats_for(self, trace: _Trace, call: AttentionCall) -> tuple:
        if call.kind == "cross":
            return tuple(s for s in trace.recorder.stats if s == "entropy")
        return tuple(s for s in trace.recorder.stats if s != "label_mass" or trace.labels is not None)

    def before(self, call: AttentionCall) -> Optional[OpRequest]:
        info = self._info[call.layer]
        needs_grid = any(s in ("distance", "label_mass") for t in self._traces for s in self._stats_for(t, call))
        maps = self._maps_for(call)
        needs_grid = needs_grid or bool(maps)
        n_image, span = call.n_queries, None
        if call.kind == "joint":
            span = self._image_span(call)
            if span is None:
                if self._traces or maps:
                    raise ValueError(
                        f"layer {call.layer}: a joint sequence of {call.n_queries} tokens joined before the attention "
                        "module, and no two-stream joint layer earlier in this forward pass to tell its text length; "
                        "its image-token statistics cannot be recorded")
            else:
                n_image = span[1] - span[0]
                info.text_tokens = call.n_queries - n_image
        grid = self._grid(info, call, required=needs_grid, n_tokens=n_image)
        if not (self._traces or self._interventions or self._captures or self._gates or maps):
            return None
        request = OpRequest()
        if maps:  # heatmaps sum over heads: so does the kernel, keeping one (B, 1, Nq, T) output
            request.stats = ("key_group_mass",)
            request.key_groups, request.n_groups = self._text_token_groups(call, span)
            request.key_group_mass_heads = "sum"
        if self._traces:
            stats = {s for t in self._traces for s in self._stats_for(t, call)} | set(request.stats)
            request.stats = tuple(sorted(stats))
            if call.kind == "joint":
                request.stats = tuple(sorted(stats - _IMAGE_KEY_STATS))
                request.image_stats = tuple(sorted(stats & _IMAGE_KEY_STATS))
                request.image_span = span
            if "distance" in stats:
                request.grid = (grid, grid)
            if "label_mass" in stats:
                trace = next(t for t in self._traces if t.labels is not None)
                key = (grid, call.batch)
                if key not in trace.token_labels:
                    lab = labels_to_grid(trace.labels.to(call.value.device), grid)
                    trace.token_labels[key] = tile_batch(lab, call.batch, "labels").to(torch.int32)
                request.labels = (trace.token_labels[key], trace.token_labels[key])
        ivs = [iv for level in self._interventions for iv in level.get(call.layer, ())]
        scale, rep = head_arguments(ivs, call)
        for gates, baseline in self._gates:
            g = gates.get(call.layer)
            if g is None:
                continue
            if rep is not None:
                raise NotImplementedError(
                    f"layer {call.layer}: gates (attribution) cannot be combined with Mean/Patch/Uniform interventions")
            g = g.to(call.value.device)
            scale = g if scale is None else scale * g
            if baseline is not None:
                rep = _baseline(baseline, call)
        request.head_scale, request.head_replacement = scale, rep
        return request

    def _maps_for(self, call: AttentionCall) -> list:
        if call.kind not in ("cross", "joint"):
            return []
        return [m for m in self._heatmaps if m.wants(call.layer)]

    def _text_token_groups(self, call: AttentionCall, span: Optional[tuple]) -> tuple:
        """((B, Nk) int32 key groups, T): text token j of the keys is group j, image keys -1."""
        key = (call.n_keys, span, call.batch, call.value.device)
        if key not in self._key_groups:
            groups = torch.arange(call.n_keys, dtype=torch.int32)
            if span is not None:  # joint: the text tokens are the keys outside the image span
                start, stop = span
                groups[start:stop] = -1
                groups[stop:] -= stop - start
            self._key_groups = {key: groups.to(call.value.device).expand(call.batch, -1).contiguous()}
        groups = self._key_groups[key]
        return groups, call.n_keys - (0 if span is None else span[1] - span[0])

    def after(self, call: AttentionCall, result) -> None:
        maps = self._maps_for(call)
        if maps:
            info = self._info[call.layer]
            mass = result.key_group_mass
            if call.kind == "joint":
                start, stop = self._image_span(call)
                mass = mass[:, :, start:stop]
            for m in maps:
                m.add(call.layer, info.grid, mass)
        if self._traces:
            info = self._info[call.layer]
            for trace in self._traces:
                values = {s: getattr(result, s) for s in self._stats_for(trace, call)}
                if call.kind == "joint":
                    values, text = _split_joint(values, info.text_tokens, self._image_span(call))
                    if text:
                        trace.recorder.record(info.text_name, call.n_keys, None, text)
                trace.recorder.record(call.layer, call.n_keys, info.grid, values)
        for callback in self._captures:
            callback(call.layer, result.out)


def _split_joint(values: dict, text_tokens: int, span: tuple) -> tuple:
    """({stat: image-query values}, {stat: text-query values}) of a joint call's values.

    Entropy (B, H, N) covers every query and is split at span; distance and label mass
    (B, H, N_img) come from the image-only call.
    """
    start, stop = span
    image, text = {}, {}
    for stat, x in values.items():
        if stat in _IMAGE_KEY_STATS:
            image[stat] = x
            continue
        image[stat] = x[..., start:stop]
        if text_tokens:
            text[stat] = torch.cat([x[..., :start], x[..., stop:]], dim=-1)
    return image, text


def _refusal(owner: str, layers: dict) -> str:
    return (f"{owner}: {len(layers)} attention layer(s) have a processor without a fused counterpart, whose "
            f"replacement would change the model's output: {describe_unsupported(layers)}. Supported processor "
            f"classes: {', '.join(supported_names())}.")


def _baseline(baseline: dict, call: AttentionCall) -> torch.Tensor:
    """(B|1, H, Nq, Dv) replacement from a mean (H, Nq, Dv) or cached (Bc, H, Nq, Dv) head-output table."""
    if call.layer not in baseline:
        raise KeyError(f"baseline has no entry for layer {call.layer!r}")
    b = baseline[call.layer].to(call.value.device)
    if b.dim() == 3:
        return b.unsqueeze(0)
    return tile_batch(b, call.batch, f"baseline[{call.layer!r}]")
