"""run_conditions under a trace: per-image tags, image ids and label maps of the B images tile
over the C conditions of one batch, so every recorded number equals a separate run per condition,
in full passes and in passes resumed from the clean pass (whose skipped layers the recorder gets
from the clean pass, once per condition; the extra clean pass itself is not recorded)."""

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import tiny_models as tm
from helpers import tiny_transformers as tt
from diffcirc.processor import Recorder, Scale, Session, Zero, run_conditions

L0, L1, MID = "down_blocks.1.attentions.0", "down_blocks.1.attentions.1", "mid_block.attentions.0"
ATOL = 1e-5
CONDITIONS = [[], [Zero(L0, 2)], [Scale(L1, [0, 3], alpha=0.4)], [Zero(L0, 5), Zero(L1, 1)]]
DATASETS = ["synthetic", "natural"]  # one per image: a per-image tag that must tile like the images
IDS = [10, 11]


def _label_maps() -> torch.Tensor:
    """(2, 16, 16): image 10 split left / right, image 11 top / bottom with a third region."""
    labels = torch.zeros(2, 16, 16, dtype=torch.long)
    labels[0, :, 8:] = 1
    labels[1, 8:] = 1
    labels[1, 2:6, 3:13] = 2
    return labels


def _recorder() -> Recorder:
    return Recorder(bins=8, per_image=True, maps={"layers": [MID], "images": None})


def _sorted(frame: pd.DataFrame, values: list) -> pd.DataFrame:
    keys = [c for c in frame.columns if c not in values]
    return frame.sort_values(keys).reset_index(drop=True)


def _tag_per_pass(recorder):
    """on_pass: element e of a pass is condition indices[e // 2], image e % 2."""
    return lambda indices: recorder.set_tags(condition=[c for c in indices for _ in IDS], dataset=DATASETS,
                                             image_ids=IDS)


@pytest.mark.parametrize("reuse", [True, False], ids=["resumed", "one-full-pass"])
def test_recorder_tags_ids_and_label_maps_tile_over_conditions_like_separate_runs(reuse):
    model = tm.unet2d()
    session = Session(model)
    x, t = tm.unet2d_inputs(2)
    labels = _label_maps()
    forward = lambda xt: model(*xt).sample  # noqa: E731
    first_layer_ran = []  # batch elements through a layer before every attention layer
    hook = model.time_embedding.linear_1.register_forward_pre_hook(lambda m, a: first_layer_ran.append(a[0].shape[0]))

    batched = _recorder()
    if reuse:  # passes grouped by the first stage each condition changes, tagged per pass
        with session.trace(batched, labels=labels), torch.no_grad():
            eps = run_conditions(session, forward, (x, t), CONDITIONS, reuse=True, on_pass=_tag_per_pass(batched))
    else:  # one pass of 4 conditions x 2 images, tagged before it
        batched.set_tags(condition=[c for c in range(len(CONDITIONS)) for _ in IDS], dataset=DATASETS, image_ids=IDS)
        with session.trace(batched, labels=labels), torch.no_grad():
            eps = run_conditions(session, forward, (x, t), CONDITIONS, reuse=False)
    hook.remove()
    assert sum(first_layer_ran) == (2 if reuse else 8)  # resumed: the clean pass computed it, once
    separate = _recorder()
    expected_eps = []
    for c, condition in enumerate(CONDITIONS):
        separate.set_tags(condition=c, dataset=DATASETS, image_ids=IDS)
        with session.trace(separate, labels=labels), session.intervene(condition), torch.no_grad():
            expected_eps.append(model(x, t).sample)
    assert (eps - torch.stack(expected_eps)).abs().max() <= ATOL

    moments = ["count", "mean", "std", "m2"]
    got, want = _sorted(batched.to_frame(), moments), _sorted(separate.to_frame(), moments)
    assert len(got) == 4 * 2 * 3 * 8 * 3  # conditions x datasets x layers x heads x stats
    assert got.drop(columns=["mean", "std", "m2"]).equals(want.drop(columns=["mean", "std", "m2"]))
    np.testing.assert_allclose(got[["mean", "std"]].to_numpy(), want[["mean", "std"]].to_numpy(), atol=ATOL, rtol=0)

    got, want = _sorted(batched.per_image_frame(), ["mean"]), _sorted(separate.per_image_frame(), ["mean"])
    assert got.drop(columns="mean").equals(want.drop(columns="mean")) and len(got) == 4 * 2 * 3 * 8 * 3
    assert set(zip(got["dataset"], got["image"])) == set(zip(DATASETS, IDS))
    np.testing.assert_allclose(got["mean"].to_numpy(), want["mean"].to_numpy(), atol=ATOL, rtol=0)

    got, want = _sorted(batched.maps_frame(), ["value"]), _sorted(separate.maps_frame(), ["value"])
    assert got.drop(columns="value").equals(want.drop(columns="value"))
    np.testing.assert_allclose(got["value"].to_numpy(), want["value"].to_numpy(), atol=ATOL, rtol=0)

    got, want = _sorted(batched.histograms(), ["count"]), _sorted(separate.histograms(), ["count"])
    assert got.drop(columns="count").equals(want.drop(columns="count"))
    assert np.abs(got["count"].to_numpy() - want["count"].to_numpy()).sum() <= 8  # values on a bin edge may move

    # not vacuous: the two label maps give the images different label mass, and the conditions
    # change the statistics of the layers after the ablated ones
    per_image = separate.per_image_frame()
    label_mass = per_image[(per_image["stat"] == "label_mass") & (per_image["condition"] == 0)]
    by_image = label_mass.pivot_table(index=["layer", "head"], columns="image", values="mean")
    assert (by_image[10] - by_image[11]).abs().max() > 0.05
    entropy = per_image[(per_image["stat"] == "entropy") & (per_image["layer"] == MID)]
    by_condition = entropy.pivot_table(index=["image", "head"], columns="condition", values="mean")
    assert min((by_condition[c] - by_condition[0]).abs().max() for c in (1, 2, 3)) > 1e-3


def _frames(recorder: Recorder) -> dict:
    return {"aggregates": _sorted(recorder.to_frame(), ["count", "mean", "std", "m2"]),
            "per_image": _sorted(recorder.per_image_frame(), ["mean"]),
            "maps": _sorted(recorder.maps_frame(), ["value"])}


def _assert_same_records(got: Recorder, want: Recorder):
    for name, frame in _frames(want).items():
        other = _frames(got)[name]
        values = [c for c in ("mean", "std", "value") if c in frame]
        assert len(frame) > 0 and other.drop(columns=values + ["m2"], errors="ignore").equals(
            frame.drop(columns=values + ["m2"], errors="ignore")), name
        np.testing.assert_allclose(other[values].to_numpy(), frame[values].to_numpy(), atol=ATOL, rtol=0, err_msg=name)


def test_the_clean_pass_of_reuse_is_not_recorded_when_no_condition_is_clean():
    model = tm.unet2d()
    session = Session(model)
    x, t = tm.unet2d_inputs(2)
    forward = lambda xt: model(*xt).sample  # noqa: E731
    conditions = CONDITIONS[1:]  # no clean condition: the clean pass that reuse adds is not one of them
    got = _recorder()
    with session.trace(got, labels=_label_maps()), torch.no_grad():
        run_conditions(session, forward, (x, t), conditions, reuse=True, on_pass=_tag_per_pass(got))
    want = _recorder()
    for c, condition in enumerate(conditions):
        want.set_tags(condition=c, dataset=DATASETS, image_ids=IDS)
        with session.trace(want, labels=_label_maps()), session.intervene(condition), torch.no_grad():
            model(x, t)
    _assert_same_records(got, want)
    counts = got.to_frame()
    assert set(counts["count"]) == {64} and len(counts) == 3 * 2 * 3 * 8 * 3  # each condition and image once


def test_flux_single_stream_layers_resumed_past_the_two_stream_blocks_record_like_full_passes():
    # single-stream layers take their text length from the pass's last two-stream layer, which a
    # pass resumed at a single-stream block does not run
    built = tt.flux()
    session = Session(built.model)
    inputs = built.inputs(1)
    forward = lambda kw: built.model(**kw).sample  # noqa: E731
    single = [name for name in session.layer_names if name.startswith("single_transformer_blocks")]
    conditions = [[], [Zero(single[-1], 1)], [Zero(single[0], 2)]]

    def recorder():
        return Recorder(bins=8, per_image=True, maps={"layers": [single[-1]], "images": None})

    got = recorder()
    with session.trace(got, labels=built.label_map()), torch.no_grad():
        eps = run_conditions(session, forward, inputs, conditions, reuse=True, on_pass=_tag_per_pass(got))
    want, expected = recorder(), []
    for c, condition in enumerate(conditions):
        want.set_tags(condition=c, dataset=DATASETS, image_ids=IDS)
        with session.trace(want, labels=built.label_map()), session.intervene(condition), torch.no_grad():
            expected.append(forward(inputs))
    expected = torch.stack(expected)
    assert (eps - expected).abs().max() <= ATOL * expected.abs().max()
    _assert_same_records(got, want)
    assert any(name.endswith(":text") for name in got.to_frame()["layer"])


def test_nested_traces_each_record_like_full_passes():
    model = tm.unet2d()
    session = Session(model)
    x, t = tm.unet2d_inputs(2)
    forward = lambda xt: model(*xt).sample  # noqa: E731
    conditions = [[], [Zero(MID, 1)], [Scale(L1, 2, alpha=0.5)], [Zero(MID, 3)]]  # L0 before all: replayed

    def recorders():
        outer = Recorder(stats=("entropy", "distance"), bins=8)  # per-image tags only: the conditions pooled
        outer.set_tags(dataset=DATASETS)
        return outer, _recorder()

    outer, inner = recorders()
    with session.trace(outer), session.trace(inner, labels=_label_maps()), torch.no_grad():
        run_conditions(session, forward, (x, t), conditions, reuse=True, on_pass=_tag_per_pass(inner))
    want_outer, want_inner = recorders()
    for c, condition in enumerate(conditions):
        want_inner.set_tags(condition=c, dataset=DATASETS, image_ids=IDS)
        with session.trace(want_outer), session.trace(want_inner, labels=_label_maps()), \
                session.intervene(condition), torch.no_grad():
            model(x, t)
    _assert_same_records(inner, want_inner)
    moments = ["count", "mean", "std", "m2"]
    got, want = _sorted(outer.to_frame(), moments), _sorted(want_outer.to_frame(), moments)
    assert set(got["count"]) == {4 * 64}  # each of the 4 conditions' 64 queries of an image, per dataset
    assert got.drop(columns=["mean", "std", "m2"]).equals(want.drop(columns=["mean", "std", "m2"]))
    np.testing.assert_allclose(got[["mean", "std"]].to_numpy(), want[["mean", "std"]].to_numpy(), atol=ATOL, rtol=0)
