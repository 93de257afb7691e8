"""Token heatmaps (``TokenHeatmaps`` inside ``session.heatmaps``) equal DAAM's materialising
computation in float64: each cross / joint layer's softmax recomputed from the module's weights
and inputs (``tiny_transformers.attention_probabilities``, none of diffcirc's code), the image
queries' probabilities on each text token summed over heads, resampled with ``F.interpolate`` to
one size and summed over layers and passes."""

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_models as tm
from helpers import tiny_transformers as tt
from diffcirc.processor import Recorder, Session, TokenHeatmaps, Zero

TOL = 2e-5


def _layer_inputs(model, names) -> dict:
    """Hooks recording each named module's call inputs: {name: [(args, kwargs), ...]}; returns (calls, hooks)."""
    calls = {name: [] for name in names}
    modules = dict(model.named_modules())
    hooks = [modules[name].register_forward_pre_hook(
        lambda m, args, kwargs, name=name: calls[name].append((args, kwargs)), with_kwargs=True) for name in names]
    return calls, hooks


def _oracle(family: str, model, calls: dict, kinds: dict, text: int, grid, size) -> torch.Tensor:
    """(B, T, S_h, S_w) float64: DAAM's sum over layers, calls and heads of each image query's mass on each text token."""
    modules = dict(model.named_modules())
    total = 0
    h, w = grid
    for name, seen in calls.items():
        for args, kwargs in seen:
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            mask = kwargs.get("attention_mask")  # cross layers: the additive bias (B, 1, Nk) the model built
            p = tt.attention_probabilities(family, modules[name], hidden, context, mask,
                                           kwargs.get("image_rotary_emb"))  # (B, H, Nq, Nk)
            n = p.shape[-1]
            if kinds[name] == "cross":
                image_q, text_k = slice(None), slice(None)
            elif family == "sd3":  # image tokens first
                image_q, text_k = slice(0, n - text), slice(n - text, n)
            else:  # flux, auraflow: text first
                image_q, text_k = slice(text, n), slice(0, text)
            mass = p[:, :, image_q, text_k].sum(dim=1)  # (B, h*w, T)
            maps = mass.transpose(1, 2).reshape(mass.shape[0], -1, h, w)
            total = total + F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    return total


def _text_layers(built) -> list:
    return [name for name, kind in built.kinds.items() if kind in ("cross", "joint")]


@pytest.mark.parametrize("build", [tt.sd3, tt.flux, tt.auraflow, tt.sana], ids=["sd3", "flux", "auraflow", "sana"])
def test_heatmaps_equal_the_materialising_float64_computation(build):
    built = build()
    session = Session(built.model, unsupported="skip")
    layers = _text_layers(built)
    size = (2 * built.grid[0], 2 * built.grid[1])
    maps = TokenHeatmaps(size)
    calls, hooks = _layer_inputs(built.model, layers)
    with torch.no_grad():
        want_out = built.run()
        for c in calls.values():
            c.clear()
        with session.heatmaps(maps):
            got_out = built.run()
    for hk in hooks:
        hk.remove()
    assert ((got_out - want_out).abs().max() / want_out.abs().max()).item() <= 1e-5
    want = _oracle(built.family, built.model, calls, built.kinds, built.text_tokens, built.grid, size)
    assert maps.n_tokens == built.text_tokens and maps.images == list(range(built.batch))
    for b in range(built.batch):
        assert maps.count(b) == len(layers)
        got = maps.sum(b)
        assert got.shape == (built.text_tokens, *size)
        assert torch.allclose(got, want[b], rtol=TOL, atol=TOL), (got - want[b]).abs().max()


def test_cross_attention_heatmaps_of_a_unet_with_a_padding_mask():
    model = tm.cond_unet()
    x, t, enc, mask = tm.cond_inputs(2, hw=(8, 8), text_len=7)
    session = Session(model)
    cross = [info.name for info in session.layers if info.kind == "cross"]
    calls, hooks = _layer_inputs(model, cross)
    maps = TokenHeatmaps((8, 8))
    with torch.no_grad(), session.heatmaps(maps):
        model(x, t, enc, encoder_attention_mask=mask)
    for hk in hooks:
        hk.remove()
    assert all(kw["attention_mask"] is not None for name in cross for _, kw in calls[name])
    grids = {info.name: info.grid for info in session.layers}
    want = sum(_oracle("sana", model, {name: calls[name]}, {name: "cross"}, 7, grids[name], (8, 8)) for name in cross)
    for b in range(2):
        assert torch.allclose(maps.sum(b), want[b], rtol=TOL, atol=TOL)
    # element 1 keeps 5 of 7 tokens: the padded ones get no mass
    assert maps.sum(1)[5:].abs().max() == 0 and maps.sum(1)[:5].min() > 0


def test_heatmaps_sum_over_passes_per_image_id_and_normalise_per_token():
    built = tt.flux()
    session = Session(built.model)
    maps = TokenHeatmaps(built.grid)
    with torch.no_grad(), session.heatmaps(maps):
        maps.set_tags(image_ids=["a", "b"])
        built.run(seed=1)
        once = maps.sum("a")
        maps.set_tags(image_ids=["a"])  # a batch of 2 elements, both image "a"
        built.run(seed=1)
    layers = len(_text_layers(built))
    assert maps.count("a") == 3 * layers and maps.count("b") == layers
    # element 1 of the second pass used seed 1's second sample, so only element 0 repeats "a"'s first pass
    assert not torch.allclose(maps.sum("a"), 3 * once)
    n = maps.normalised("a")
    assert torch.allclose(n.flatten(1).amax(dim=1), torch.ones(n.shape[0], dtype=torch.float64))
    frame = maps.to_frame(tokens=[0, 2])
    assert len(frame) == 2 * 2 * built.grid[0] * built.grid[1]
    row = frame[(frame.image == "b") & (frame.token == 2) & (frame.row == 1) & (frame.col == 3)]
    assert row.value.item() == pytest.approx(maps.mean("b")[2, 1, 3].item())


def test_heatmaps_and_trace_and_interventions_together():
    built = tt.sd3()
    session = Session(built.model)
    maps, both = TokenHeatmaps(built.grid), TokenHeatmaps(built.grid)
    rec_alone, rec_both = Recorder(stats=("entropy", "distance"), bins=4), Recorder(stats=("entropy", "distance"), bins=4)
    layer = "transformer_blocks.0.attn"
    with torch.no_grad():
        with session.intervene([Zero(layer, 1)]):
            with session.heatmaps(maps):
                out_maps = built.run()
            with session.trace(rec_alone):
                out_alone = built.run()
            with session.trace(rec_both), session.heatmaps(both):
                out_both = built.run()
    # statistics never change out beyond the kernels' rounding (different accumulator sets per call)
    scale = out_alone.abs().max()
    assert (out_maps - out_alone).abs().max() <= 1e-6 * scale and (out_both - out_alone).abs().max() <= 1e-6 * scale
    for b in range(built.batch):
        assert torch.allclose(maps.sum(b), both.sum(b), rtol=1e-6, atol=1e-7)
    a, c = rec_alone.to_frame(), rec_both.to_frame()
    assert a[["layer", "head", "stat", "count"]].equals(c[["layer", "head", "stat", "count"]])
    assert (a["mean"] - c["mean"]).abs().max() < 1e-6


def test_heatmaps_refuse_self_attention_layers_and_mismatched_tokenisations():
    built = tt.sd3(dual_attention=True)
    session = Session(built.model)
    with pytest.raises(ValueError, match="self-attention: token heatmaps come from cross and joint layers"):
        with session.heatmaps(TokenHeatmaps(4, layers=["transformer_blocks.0.attn2"])):
            pass
    with pytest.raises(TypeError, match="TokenHeatmaps"):
        with session.heatmaps(Recorder()):
            pass
    maps = TokenHeatmaps((2, 2))
    maps.add("a", (1, 2), torch.rand(1, 2, 2, 3))
    with pytest.raises(ValueError, match="layer b sees 4 text tokens, but layer a saw 3"):
        maps.add("b", (1, 2), torch.rand(1, 2, 2, 4))
    with pytest.raises(ValueError, match="do not fill its grid"):
        maps.add("a", (2, 2), torch.rand(1, 2, 2, 3))
    with pytest.raises(KeyError, match="no heatmaps for image 5"):
        maps.sum(5)
