"""Interventions equal manual edits of the pre-to_out hidden states under diffusers' own processor;
C conditions in one batch equal C separate runs."""

import pytest
import torch

from helpers import tiny_models as tm
from helpers.hooks import removed_after
from diffcirc.processor import (Mean, Patch, Scale, Session, Uniform, Zero, cache_head_outputs, mean_head_outputs,
                                run_conditions)
from diffcirc.processor.stage_reuse import ReuseFallback

TOL = 1e-5
L0, L1, MID = "down_blocks.1.attentions.0", "down_blocks.1.attentions.1", "mid_block.attentions.0"


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H*D) -> (B, N, H, D) view."""
    return x.view(*x.shape[:2], heads, -1)


def _with_edits(model, edits: dict, run):
    """run() under AttnProcessor2_0 with edits[layer](x) rewriting to_out[0]'s input x (B, N, H*D)."""
    modules = tm.attention_modules(model)
    handles = [modules[layer].to_out[0].register_forward_pre_hook(lambda mod, args, f=f: (f(args[0].clone()),))
               for layer, f in edits.items()]
    with removed_after(handles):
        with torch.no_grad():
            return run()


def _captured_inputs(model, layers, run) -> dict:
    """{layer: to_out[0] input (B, N, H*D)} of one AttnProcessor2_0 pass."""
    seen = {}
    modules = tm.attention_modules(model)
    handles = [modules[layer].to_out[0].register_forward_pre_hook(
        lambda mod, args, layer=layer: seen.__setitem__(layer, args[0].clone())) for layer in layers]
    with removed_after(handles):
        with torch.no_grad():
            run()
    return seen


def _fused(session, interventions, run):
    with session.intervene(interventions), torch.no_grad():
        return run()


@pytest.fixture(scope="module")
def unet():
    model = tm.unet2d()
    x, t = tm.unet2d_inputs(3)
    return model, Session(model), x, t


def test_zero_and_scale_per_element(unet):
    model, session, x, t = unet
    run = lambda: model(x, t).sample  # noqa: E731

    def edit_l0(x):
        v = _heads(x, 8)
        v[0, :, 2] = 0
        v[1:, :, 4:6] *= 0.5
        return x

    def edit_mid(x):
        _heads(x, 8)[2] = 0
        return x

    expected = _with_edits(model, {L0: edit_l0, MID: edit_mid}, run)
    got = _fused(session, [Zero(L0, 2, elements=[0]), Scale(L0, [4, 5], alpha=0.5, elements=[1, 2]),
                           Zero(MID, None, elements=[2])], run)
    assert (got - expected).abs().max() <= TOL
    assert (got - _fused(session, [], run)).abs().max() > 1e-3


def test_later_intervention_wins_on_the_same_head(unet):
    model, session, x, t = unet
    run = lambda: model(x, t).sample  # noqa: E731
    got = _fused(session, [Zero(L1, 3), Scale(L1, 3, alpha=2.0)], run)
    assert torch.allclose(got, _fused(session, [Scale(L1, 3, alpha=2.0)], run), atol=TOL)


def test_mean_ablation_with_dataset_means(unet):
    model, session, x, t = unet
    batches = [tm.unet2d_inputs(2, seed=s)[0] for s in (11, 12, 13)]
    means = mean_head_outputs(session, lambda xb: model(xb, t[:2]), batches)
    manual = torch.cat([_captured_inputs(model, [L1], lambda xb=xb: model(xb, t[:2]))[L1] for xb in batches])
    manual = _heads(manual, 8).mean(dim=0).transpose(0, 1)  # (H, N, D)
    assert means[L1].shape == (8, 64, 8)
    torch.testing.assert_close(means[L1], manual, atol=1e-6, rtol=0)

    def edit(x):
        _heads(x, 8)[1:, :, 6] = manual[6]
        return x

    run = lambda: model(x, t).sample  # noqa: E731
    expected = _with_edits(model, {L1: edit}, run)
    got = _fused(session, [Mean(L1, 6, means=means, elements=[1, 2])], run)
    assert (got - expected).abs().max() <= TOL


def test_patch_from_another_input(unet):
    model, session, x, t = unet
    x_src = tm.unet2d_inputs(3, seed=21)[0]
    cache = cache_head_outputs(session, lambda: model(x_src, t))
    source = _captured_inputs(model, [MID], lambda: model(x_src, t))[MID]

    def edit(x):
        _heads(x, 8)[:, :, [1, 3]] = _heads(source, 8)[:, :, [1, 3]]
        return x

    run = lambda: model(x, t).sample  # noqa: E731
    expected = _with_edits(model, {MID: edit}, run)
    got = _fused(session, [Patch(MID, [1, 3], cache=cache)], run)
    assert (got - expected).abs().max() <= TOL


def test_uniform_attention_self_attention(unet):
    model, session, x, t = unet
    values = {}
    to_v = tm.attention_modules(model)[L0].to_v
    handle = to_v.register_forward_hook(lambda mod, args, out: values.__setitem__("v", out.detach().clone()))

    def edit(x):
        _heads(x, 8)[:, :, 7] = _heads(values["v"], 8)[:, :, 7].mean(dim=1, keepdim=True)
        return x

    run = lambda: model(x, t).sample  # noqa: E731
    try:
        expected = _with_edits(model, {L0: edit}, run)
    finally:
        handle.remove()
    got = _fused(session, [Uniform(L0, 7)], run)
    assert (got - expected).abs().max() <= TOL


def test_uniform_attention_cross_attention_respects_text_mask():
    model = tm.cond_unet()
    session = Session(model)
    x, t, enc, mask = tm.cond_inputs(2)
    layer = "mid_block.attentions.0.transformer_blocks.0.attn2"
    values = {}
    handle = tm.attention_modules(model)[layer].to_v.register_forward_hook(
        lambda mod, args, out: values.__setitem__("v", out.detach().clone()))

    def edit(x):
        v = _heads(values["v"], 4)[:, :, 0]  # (B, L, D)
        keep = mask[:, :, None]
        _heads(x, 4)[:, :, 0] = ((v * keep).sum(1) / keep.sum(1))[:, None]
        return x

    run = lambda: model(x, t, enc, encoder_attention_mask=mask).sample  # noqa: E731
    try:
        expected = _with_edits(model, {layer: edit}, run)
    finally:
        handle.remove()
    got = _fused(session, [Uniform(layer, 0)], run)
    assert (got - expected).abs().max() <= TOL


def test_conditions_in_one_batch_equal_separate_runs(unet):
    model, session, x, t = unet
    x2, t2 = x[:2], t[:2]
    means = mean_head_outputs(session, lambda xb: model(xb, t2), [x2])
    cache = cache_head_outputs(session, lambda: model(tm.unet2d_inputs(2, seed=31)[0], t2))
    conditions = [
        [],
        Zero(L0, 0),
        [Scale(L1, [1, 2], alpha=0.3), Zero(MID, 4, elements=[1])],
        [Uniform(MID, 5)],
        [Mean(L1, 2, means=means)],
        [Patch(L0, 6, cache=cache, elements=[0])],
    ]
    forward = lambda xt: model(*xt).sample  # noqa: E731
    separate = torch.stack([_fused(session, c, lambda: forward((x2, t2))) for c in conditions])
    with torch.no_grad():
        batched = run_conditions(session, forward, (x2, t2), conditions, max_batch=4)
        with pytest.warns(ReuseFallback, match="holds less than the stored stage outputs"):
            by_bytes = run_conditions(session, forward, (x2, t2), conditions, max_bytes=1)  # one per pass, full
        unlimited = run_conditions(session, lambda xt: {"eps": model(*xt).sample}, (x2, t2), conditions)["eps"]
    assert batched.shape == (6, 2, 3, 16, 16)
    for got in (batched, by_bytes, unlimited):
        assert (got - separate).abs().max() <= TOL
    assert (separate[1:] - separate[0]).flatten(1).abs().amax(1).min() > 1e-4  # every condition changes the output


def test_chunks_respect_max_batch(unet):
    model, session, x, t = unet
    sizes = []

    def forward(xt):
        sizes.append(xt[0].shape[0])
        return model(*xt).sample

    conditions = [[Zero(L0, h)] for h in range(5)]
    with torch.no_grad():
        run_conditions(session, forward, (x, t), conditions, max_batch=7, reuse=False)
        assert sizes == [6, 6, 3]  # 2 conditions of 3 images per pass
        sizes.clear()
        run_conditions(session, forward, (x, t), conditions, max_batch=7, reuse=True)
    assert sizes == [3, 6, 6, 3]  # reuse's clean pass of the 3 images, then the same chunks
    with pytest.raises(ValueError, match="max_batch"):
        run_conditions(session, forward, (x, t), [[]], max_batch=2)


def test_bad_addresses_raise(unet):
    model, session, x, t = unet
    with pytest.raises(IndexError, match="head"):
        _fused(session, [Zero(L0, 8)], lambda: model(x, t))
    with pytest.raises(IndexError, match="elements"):
        _fused(session, [Zero(L0, 0, elements=[3])], lambda: model(x, t))
    with pytest.raises(ValueError, match="means"):
        _fused(session, [Mean(L0, 0, means={L0: torch.zeros(8, 16, 8)})], lambda: model(x, t))
