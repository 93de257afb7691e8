"""Session: enumerating attention layers, token grids, installing and restoring processors."""

import math

import pytest
import torch
from diffusers.models.attention_processor import Attention

from helpers import tiny_models as tm
from diffcirc.processor import FusedAttnProcessor, Recorder, Session, Zero
from diffcirc.processor.grid import infer_grid, labels_to_grid


def _processors(model):
    return {name: m.processor for name, m in tm.attention_modules(model).items()}


def test_layers_of_unet2d():
    session = Session(tm.unet2d())
    assert [(i.name, i.kind, i.heads, i.head_dim, i.grid) for i in session.layers] == [
        ("down_blocks.1.attentions.0", "self", 8, 8, None),
        ("down_blocks.1.attentions.1", "self", 8, 8, None),
        ("mid_block.attentions.0", "self", 8, 8, None),
    ]
    assert all(type(i.heads) is int and type(i.head_dim) is int for i in session.layers)  # counts, not 8.0
    assert len(session.heads()) == 24


@pytest.mark.parametrize("call", ["positional", "keywords"])
def test_layers_and_grids_of_cond_unet_inferred_from_input_size(call):
    # the input size comes from the first positional argument or from sample=, not config.sample_size (8)
    model = tm.cond_unet()
    session = Session(model)
    kinds = {i.name.rsplit(".", 1)[-1]: i.kind for i in session.layers}
    assert kinds == {"attn1": "self", "attn2": "cross"} and len(session.layers) == 8
    x, t, enc, mask = tm.cond_inputs(1, hw=(8, 12))
    with session.trace(Recorder(stats=("entropy", "distance"))) as rec, torch.no_grad():
        if call == "positional":
            model(x, t, enc, encoder_attention_mask=mask)
        else:
            model(sample=x, timestep=t, encoder_hidden_states=enc, encoder_attention_mask=mask)
    grids = {i.name: i.grid for i in session.layers}
    assert grids["down_blocks.0.attentions.0.transformer_blocks.0.attn1"] == (8, 12)
    assert grids["mid_block.attentions.0.transformer_blocks.0.attn1"] == (4, 6)
    assert grids["mid_block.attentions.0.transformer_blocks.0.attn2"] == (4, 6)  # the query grid
    frame = rec.to_frame()
    assert set(frame[frame.layer.str.endswith("attn2")].stat) == {"entropy"}  # no distance for cross-attention


def test_entropy_histograms_span_ln_of_each_layers_keys():
    # [0, ln Nk]: a cross-attention layer's keys are the 7 text tokens, not its 64 or 16 queries
    model = tm.cond_unet()
    session = Session(model)
    x, t, enc, mask = tm.cond_inputs(2, hw=(8, 8), text_len=7)
    with session.trace(Recorder(stats=("entropy",), bins=8)) as rec, torch.no_grad():
        model(x, t, enc, encoder_attention_mask=mask)
    hist = rec.histograms()
    ranges = {layer: (f.lo.min(), f.hi.max()) for layer, f in hist.groupby("layer")}
    n_queries = {i.name: i.grid[0] * i.grid[1] for i in session.layers}
    assert set(n_queries.values()) == {64, 16} and set(ranges) == set(n_queries)
    for layer, (lo, hi) in ranges.items():
        n_keys = 7 if layer.endswith("attn2") else n_queries[layer]
        assert lo == 0 and hi == pytest.approx(math.log(n_keys), rel=1e-12), layer


def test_grid_of_4d_input_is_taken_as_is():
    model = tm.unet2d()
    session = Session(model)
    x, t = tm.unet2d_inputs(1, hw=(16, 12))
    with session.intervene([]), torch.no_grad():
        model(x, t)
    assert {i.grid for i in session.layers} == {(8, 6)}


@pytest.mark.parametrize("call", ["positional", "keywords"])
def test_transformer2d_grid_comes_from_its_own_4d_input(call):
    # the model input is the first positional argument or hidden_states=; the model has no sample_size
    model = tm.transformer2d()
    session = Session(model)
    g = torch.Generator().manual_seed(3)
    x, enc = torch.randn(1, 32, 6, 5, generator=g), torch.randn(1, 4, 24, generator=g)
    with session.trace(Recorder(stats=("distance",))) as rec, torch.no_grad():
        if call == "positional":
            model(x, encoder_hidden_states=enc)
        else:
            model(hidden_states=x, encoder_hidden_states=enc)
    assert [(i.name, i.kind, i.grid) for i in session.layers] == [
        ("transformer_blocks.0.attn1", "self", (6, 5)), ("transformer_blocks.0.attn2", "cross", (6, 5))]
    assert set(rec.to_frame()["layer"]) == {"transformer_blocks.0.attn1"}


def test_tokens_without_an_image_input_have_no_grid():
    # a model fed (B, N, C) tokens, not an image: no input size, so no grid; entropy needs none and
    # is recorded, distance is refused by name (a 3-D input is not read as an (h, w) image: 16 tokens
    # of width 64 would fit (2, 8) by the down-sampling rule)
    model = torch.nn.Sequential(Attention(query_dim=64, heads=8, dim_head=8)).eval()
    session = Session(model)
    tokens = torch.randn(1, 16, 64)
    with session.trace(Recorder(stats=("entropy",))) as rec, torch.no_grad():
        model(tokens)
    assert session.layer("0").grid is None and set(rec.to_frame().stat) == {"entropy"}
    with pytest.raises(ValueError, match="input size is unknown"):
        with session.trace(Recorder(stats=("distance",))), torch.no_grad():
            model(tokens)


def test_infer_grid_rule_and_errors():
    assert infer_grid(64 * 64, (64, 64)) == (64, 64)
    assert infer_grid(4 * 7, (7, 13)) == (4, 7)  # ceil(7/2), ceil(13/2)
    assert infer_grid(2 * 4, (7, 13)) == (2, 4)  # ceil(7/4), ceil(13/4)
    with pytest.raises(ValueError, match="no power-of-two"):
        infer_grid(50, (16, 16))
    with pytest.raises(ValueError, match="input size is unknown"):
        infer_grid(64, None)


def test_labels_to_grid_samples_token_centres():
    label_map = torch.arange(16).view(1, 4, 4)
    assert labels_to_grid(label_map, (2, 2)).tolist() == [[5, 7, 13, 15]]
    assert labels_to_grid(label_map, (4, 4)).tolist() == [list(range(16))]


@pytest.mark.parametrize("order", ["trace_then_intervene", "intervene_then_trace"])
def test_processors_restored_after_exception_in_nested_contexts(order):
    model = tm.unet2d()
    custom = FusedAttnProcessor()  # a user's own processor must come back, not diffusers' default
    tm.set_processors(model, lambda name: custom)
    before = _processors(model)
    session = Session(model)
    x, t = tm.unet2d_inputs(1)
    with pytest.raises(RuntimeError, match="boom"):
        first = session.trace(Recorder()) if order == "trace_then_intervene" else session.intervene(
            [Zero("mid_block.attentions.0", 1)])
        second = session.intervene([Zero("mid_block.attentions.0", 1)]) if order == "trace_then_intervene" \
            else session.trace(Recorder())
        with first, second, torch.no_grad():
            inside = _processors(model)
            model(x, t)
            raise RuntimeError("boom")
    assert all(p is not custom and p.controller is session for p in inside.values())
    after = _processors(model)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert not session._traces and not session._interventions and session._depth == 0


def test_nesting_order_does_not_matter():
    model = tm.unet2d()
    session = Session(model)
    x, t = tm.unet2d_inputs(2)
    ablate = [Zero("down_blocks.1.attentions.0", 3)]
    results = []
    for order in range(2):
        rec = Recorder(stats=("entropy",), bins=8)
        with torch.no_grad():
            if order == 0:
                with session.trace(rec), session.intervene(ablate):
                    out = model(x, t).sample
            else:
                with session.intervene(ablate), session.trace(rec):
                    out = model(x, t).sample
        results.append((out, rec.to_frame()))
    assert torch.equal(results[0][0], results[1][0])
    assert results[0][1].equals(results[1][1])
    with torch.no_grad():
        clean = model(x, t).sample
    assert (clean - results[0][0]).abs().max() > 1e-4  # the intervention was active in both orders


def test_unknown_layer_and_nested_label_conflict_raise():
    session = Session(tm.unet2d())
    with pytest.raises(KeyError, match="no attention layer"):
        with session.intervene([Zero("mid_block.attention.0", 0)]):
            pass
    a, b = torch.zeros(1, 4, 4, dtype=torch.long), torch.ones(1, 4, 4, dtype=torch.long)
    with session.trace(Recorder(), labels=a):
        with pytest.raises(ValueError, match="share one label map"):
            with session.trace(Recorder(), labels=b):
                pass
    assert session._depth == 0
