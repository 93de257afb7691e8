"""Transformer diffusion models in a Session, against diffusers itself.

SD3 (and SD3.5's dual attention with RMS q/k norms), Flux, AuraFlow, Sana and the published
architectures of SD3-medium's and Flux-dev's transformers: the output inside a trace equals the
default processors'; every layer is recorded under its names (a joint layer's text queries under
``name:text``) with the kinds, grids and text lengths of the architecture; the statistics equal
those of float64 attention probabilities recomputed from each layer's own weights and inputs.
On SD3.5 and Flux, interventions and attribution equal hooks that edit the default processors'
head outputs before the output projections (``to_out[0]`` / ``to_add_out`` inputs; the module's
output in Flux's single-stream blocks).
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch

from helpers import tiny_models as tm
from helpers import tiny_transformers as tt
from helpers.hooks import removed_after
from diffcirc.processor import (Mean, Patch, Recorder, Scale, Session, Uniform, Zero, cache_head_outputs,
                                head_attribution, mean_head_outputs)

REL_TOL = 1e-5
ATOL = 2e-5  # per-query statistics of the fp32 op against float64
STATS = ("entropy", "distance", "label_mass")

MODELS = {
    "sd3": lambda: tt.sd3(),
    "sd35_dual_rms": lambda: tt.sd3(dual_attention=True, qk_norm="rms_norm"),
    "flux": tt.flux,
    "auraflow": tt.auraflow,
    "sana": tt.sana,
    "sd3_medium": tt.sd3_medium,
    "flux_dev": tt.flux_dev,
}


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def _processor_classes(model) -> dict:
    return {name: type(m.processor) for name, m in tt.attention_modules(model).items()}


# ---- one traced pass per model ------------------------------------------------------------------------

@dataclass
class Traced:
    built: tt.Built
    session: Session
    want: torch.Tensor  # output under diffusers' default processors
    got: torch.Tensor  # output inside session.trace
    recorder: Recorder
    calls: dict  # {layer: (args, kwargs)} the attention module got in the traced pass
    processors: tuple  # (classes before the trace, classes after it)


@pytest.fixture(scope="module", params=MODELS.values(), ids=MODELS.keys())
def traced(request) -> Traced:
    built = request.param()
    session = Session(built.model, unsupported="skip" if built.skipped else "refuse")
    inputs = built.inputs(built.seed)
    before = _processor_classes(built.model)
    with torch.no_grad():
        want = built.model(**inputs).sample
    calls = {}
    modules = tt.attention_modules(built.model)
    hooks = [modules[name].register_forward_pre_hook(
        lambda mod, args, kwargs, name=name: calls.__setitem__(name, (args, kwargs)), with_kwargs=True)
        for name in built.kinds]
    recorder = Recorder(stats=STATS, bins=8, maps={"layers": None, "images": None})
    recorder.set_tags(image_ids=list(range(built.batch)))
    try:
        with session.trace(recorder, labels=built.label_map()), torch.no_grad():
            got = built.model(**inputs).sample
    finally:
        for h in hooks:
            h.remove()
    return Traced(built, session, want, got, recorder, calls, (before, _processor_classes(built.model)))


def test_output_inside_a_trace_equals_the_default_processors(traced):
    assert _relative(traced.got, traced.want) <= REL_TOL
    before, after = traced.processors
    assert after == before  # the model's own processors are back after the trace


def test_layers_have_the_architectures_kinds_grids_and_text_lengths(traced):
    built, modules = traced.built, tt.attention_modules(traced.built.model)
    assert {info.name: info.kind for info in traced.session.layers} == built.kinds
    assert [s.name for s in traced.session.skipped] == list(built.skipped)
    for info in traced.session.layers:
        m = modules[info.name]
        assert (info.heads, info.head_dim) == (m.heads, m.inner_dim // m.heads)
        assert info.grid == built.grid, info.name
        joint = info.kind == "joint"
        assert info.text_tokens == (built.text_tokens if joint else None), info.name
        assert info.text_name == (f"{info.name}:text" if joint else None)


def test_every_layer_is_recorded_under_its_names_with_its_statistics(traced):
    built = traced.built
    n_image = built.grid[0] * built.grid[1]
    expected = {}  # recorder name -> (stats, samples per head)
    for name, kind in built.kinds.items():
        expected[name] = (set(STATS) if kind != "cross" else {"entropy"}, built.batch * n_image)
        if kind == "joint":
            expected[f"{name}:text"] = ({"entropy"}, built.batch * built.text_tokens)
    frame = traced.recorder.to_frame()
    heads = {info.name: info.heads for info in traced.session.layers}
    recorded = {}
    for layer, rows in frame.groupby("layer"):
        recorded[layer] = (set(rows.stat), set(rows["count"]))
        assert len(rows) == len(set(rows.stat)) * heads[layer.removesuffix(":text")]
    assert recorded == {layer: (stats, {count}) for layer, (stats, count) in expected.items()}


def _call_inputs(args: tuple, kwargs: dict) -> dict:
    """An attention module's forward inputs by name (blocks pass some positionally)."""
    names = ("hidden_states", "encoder_hidden_states", "attention_mask")
    given = {**dict(zip(names, args)), **kwargs}
    return {k: given.get(k) for k in (*names, "image_rotary_emb")}


def _image_span(built: tt.Built, hidden: torch.Tensor, context) -> tuple:
    """(start, stop) of the image tokens among a joint call's queries (and keys)."""
    if context is None:  # a single-stream block: text joined first by the block
        return built.text_tokens, hidden.shape[1]
    n_image, n_text = hidden.shape[1], context.shape[1]
    return (0, n_image) if built.family == "sd3" else (n_text, n_text + n_image)


def _expected_statistics(built: tt.Built, name: str, kind: str, p: torch.Tensor, span) -> dict:
    """{(recorder name, stat): (B, H, Nq) float64} from probabilities p (B, H, Nq, Nk)."""
    labels = tm.oracle_token_labels(built.label_map(), built.grid)
    if kind == "cross":
        return {(name, "entropy"): tm.oracle_entropy(p)}
    if kind == "self":
        return {(name, "entropy"): tm.oracle_entropy(p), (name, "distance"): tm.oracle_distance(p, built.grid),
                (name, "label_mass"): tm.oracle_label_mass(p, labels)}
    image = torch.arange(*span)
    text = torch.tensor([i for i in range(p.shape[2]) if not span[0] <= i < span[1]])
    on_image = p[:, :, image][..., image]
    on_image = on_image / on_image.sum(-1, keepdim=True)  # the softmax restricted to the image keys
    return {(name, "entropy"): tm.oracle_entropy(p[:, :, image]),
            (name, "distance"): tm.oracle_distance(on_image, built.grid),
            (name, "label_mass"): tm.oracle_label_mass(on_image, labels),
            (f"{name}:text", "entropy"): tm.oracle_entropy(p[:, :, text])}


def test_statistics_equal_float64_probabilities_from_the_layers_weights(traced):
    built, modules, maps = traced.built, tt.attention_modules(traced.built.model), traced.recorder.map_tensors()
    for name, kind in built.kinds.items():
        inputs = _call_inputs(*traced.calls[name])
        with torch.no_grad():
            p = tt.attention_probabilities(built.family, modules[name], **inputs)
        span = _image_span(built, inputs["hidden_states"], inputs["encoder_hidden_states"]) if kind == "joint" else None
        if span is not None:
            assert span[1] - span[0] == built.grid[0] * built.grid[1]
        for (layer, stat), want in _expected_statistics(built, name, kind, p, span).items():
            for b in range(built.batch):
                got = maps[((), b, layer, stat)]
                torch.testing.assert_close(got.double().reshape(want.shape[1:]), want[b], atol=ATOL, rtol=0,
                                           msg=lambda m, at=f"{layer} {stat} image {b}": f"{at}: {m}")
        # attention far from uniform (where q and k would not matter): the comparison is not vacuous
        assert tm.oracle_entropy(p).mean() < math.log(p.shape[-1]) - 0.2, name


# ---- interventions and attribution against hooks on the default processors ------------------------------

# per model: a two-stream joint layer, another layer (SD3.5's self-attention attn2 / Flux's second
# double-stream block) and a last one (SD3's context_pre_only block / Flux's first single-stream block,
# whose text tokens still reach the output through the second)
INTERVENED = {
    "sd35_dual_rms": ("transformer_blocks.0.attn", "transformer_blocks.0.attn2", "transformer_blocks.1.attn"),
    "flux": ("transformer_blocks.0.attn", "transformer_blocks.1.attn", "single_transformer_blocks.0.attn"),
}


@pytest.fixture(scope="module", params=INTERVENED, ids=INTERVENED)
def edited(request):
    built = MODELS[request.param]()
    return built, Session(built.model), INTERVENED[request.param]


def _head_output_sites(module) -> list:
    """(part, hook, module) where the default processor's head outputs (B, N, H*D) of module can be edited:
    the input of to_out[0] (image tokens) and to_add_out (text tokens), or the output of a module
    without projections (Flux's single-stream blocks: text and image tokens joined)."""
    if getattr(module, "to_out", None) is None:
        return [("joint", "output", module)]
    sites = [("image", "input", module.to_out[0])]
    if getattr(module, "to_add_out", None) is not None:
        sites.append(("text", "input", module.to_add_out))
    return sites


@contextmanager
def _head_outputs_edited(built: tt.Built, layers, edit):
    """Runs the block with edit(layer, part, x) -> x' on each layer's head outputs x (B, N, H, D), out of place."""
    modules = tt.attention_modules(built.model)
    handles = []
    for layer in layers:
        heads = modules[layer].heads

        def apply(x, layer=layer, heads=heads, part=None):
            return edit(layer, part, x.unflatten(-1, (heads, -1))).flatten(-2)

        for part, hook, target in _head_output_sites(modules[layer]):
            if hook == "input":
                handles.append(target.register_forward_pre_hook(
                    lambda mod, args, apply=apply, part=part: (apply(args[0], part=part),)))
            else:
                handles.append(target.register_forward_hook(
                    lambda mod, args, out, apply=apply, part=part: apply(out, part=part)))
    with removed_after(handles):
        yield


def _manual(built: tt.Built, layers, edit, seed=None) -> torch.Tensor:
    with _head_outputs_edited(built, layers, edit), torch.no_grad():
        return built.run(seed)


def _captured_head_outputs(built: tt.Built, layers, seeds) -> dict:
    """{(layer, part): [(B, N, H, D) per seed]} of the default processors."""
    seen: dict = {}

    def keep(layer, part, x):
        seen.setdefault((layer, part), []).append(x.clone())
        return x

    for seed in seeds:
        _manual(built, layers, keep, seed)
    return seen


def _fused(session, built: tt.Built, interventions) -> torch.Tensor:
    with session.intervene(interventions), torch.no_grad():
        return built.run()


def test_zero_and_scale_equal_edits_of_every_query_of_the_head(edited):
    built, session, (a, b, c) = edited

    def edit(layer, part, x, parts=("image", "text", "joint")):
        x = x.clone()
        if part in parts:
            if layer == a:
                x[:, :, 1] = 0
            if layer == b:
                x[:, :, 2] *= 0.5
            if layer == c:
                x[1, :, [0, 3]] = 0
        return x

    want = _manual(built, (a, b, c), edit)
    got = _fused(session, built, [Zero(a, 1), Scale(b, 2, alpha=0.5), Zero(c, [0, 3], elements=[1])])
    assert _relative(got, want) <= REL_TOL
    assert _relative(got, built.run().detach()) > 1e-3
    # the text queries' head outputs matter here, so an intervention on the image queries alone would fail
    image_only = _manual(built, (a, b, c), lambda layer, part, x: edit(layer, part, x, parts=("image", "joint")))
    assert _relative(image_only, want) > 1e-4


def _in_processor_order(built: tt.Built, parts: dict) -> torch.Tensor:
    """(H, N, D) from {part: (N_part, H, D)}: the parts as the processor joins its queries."""
    order = ("joint", "image", "text") if built.family == "sd3" else ("joint", "text", "image")
    return torch.cat([parts[p] for p in order if p in parts]).transpose(0, 1)


def test_mean_equals_the_dataset_mean_head_output_per_position(edited):
    built, session, (a, _, c) = edited
    seeds = (11, 12)
    means = mean_head_outputs(session, lambda seed: built.run(seed), seeds)
    seen = _captured_head_outputs(built, (a, c), seeds)
    manual = {key: torch.cat(xs).mean(dim=0) for key, xs in seen.items()}  # (N, H, D)
    for layer in (a, c):
        table = _in_processor_order(built, {part: m for (name, part), m in manual.items() if name == layer})
        # SD3's context_pre_only block has no to_add_out: its text part (last) is not hooked
        torch.testing.assert_close(means[layer][:, :table.shape[1]], table, atol=1e-6, rtol=0)

    def edit(layer, part, x):
        x = x.clone()
        if layer == a:
            x[:, :, 0] = manual[(a, part)][:, 0]
        if layer == c:
            x[0, :, [1, 2]] = manual[(c, part)][:, [1, 2]]
        return x

    want = _manual(built, (a, c), edit)
    got = _fused(session, built, [Mean(a, 0, means=means), Mean(c, [1, 2], means=means, elements=[0])])
    assert _relative(got, want) <= REL_TOL
    assert _relative(got, built.run().detach()) > 1e-3


def test_patch_equals_head_outputs_cached_from_another_input(edited):
    built, session, (a, b, _) = edited
    source = 21
    cache = cache_head_outputs(session, lambda: built.run(source))
    seen = {key: xs[0] for key, xs in _captured_head_outputs(built, (a, b), (source,)).items()}

    def edit(layer, part, x):
        x = x.clone()
        if layer == a:
            x[:, :, 2] = seen[(a, part)][:, :, 2]
        if layer == b:
            x[1, :, 0] = seen[(b, part)][1, :, 0]
        return x

    want = _manual(built, (a, b), edit)
    got = _fused(session, built, [Patch(a, 2, cache=cache), Patch(b, 0, cache=cache, elements=[1])])
    assert _relative(got, want) <= REL_TOL
    assert _relative(got, built.run().detach()) > 1e-3


def test_uniform_equals_the_mean_value_over_every_joint_key(edited):
    built, session, (a, _, c) = edited
    modules = tt.attention_modules(built.model)
    values: dict = {}  # (layer, projection) -> its output (B, N, H*D) in the current pass
    hooks = [getattr(modules[layer], projection).register_forward_hook(
        lambda mod, args, out, key=(layer, projection): values.__setitem__(key, out))
        for layer in (a, c) for projection in ("to_v", "add_v_proj") if getattr(modules[layer], projection, None)]

    def mean_value(layer):  # (B, H, D) over the image and text keys together
        v = torch.cat([out for (name, _), out in values.items() if name == layer], dim=1)
        return v.unflatten(-1, (modules[layer].heads, -1)).mean(dim=1)

    def edit(layer, part, x):
        x = x.clone()
        if layer == a:
            x[:, :, 3] = mean_value(a)[:, None, 3]
        if layer == c:
            x[:, :, 1] = mean_value(c)[:, None, 1]
        return x

    try:
        want = _manual(built, (a, c), edit)
    finally:
        for h in hooks:
            h.remove()
    got = _fused(session, built, [Uniform(a, 3), Uniform(c, 1)])
    assert _relative(got, want) <= REL_TOL
    assert _relative(got, built.run().detach()) > 1e-3


def test_attribution_equals_the_gradient_of_gates_on_the_head_outputs(edited):
    built, session, _ = edited
    with torch.no_grad():
        target = torch.randn(built.run().shape, generator=torch.Generator().manual_seed(9))

    def loss():
        return ((built.run() - target) ** 2).mean()

    scores = head_attribution(session, loss)
    gates = {info.name: torch.ones(info.heads, requires_grad=True) for info in session.layers}
    with _head_outputs_edited(built, gates, lambda layer, part, x: x * gates[layer][:, None]):
        grads = torch.autograd.grad(loss(), list(gates.values()))
    want = torch.cat(grads).double()
    assert list(zip(scores["layer"], scores["head"])) == session.heads()
    got = torch.tensor(scores["score"].to_numpy())
    assert _relative(got, want) <= REL_TOL
    assert want.abs().min() > 0 and want.std() > 0.1 * want.abs().max()  # every head matters, and differently


def test_flux_grid_comes_from_img_ids_passed_positionally_too():
    built = tt.flux(grid=(3, 5))
    args = built.inputs(1)
    order = ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids"]
    session = Session(built.model)
    with torch.no_grad(), session.trace(Recorder(stats=("distance",), bins=4)):
        built.model(*[args[k] for k in order])
    assert {info.grid for info in session.layers} == {(3, 5)}
