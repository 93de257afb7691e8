"""run_conditions under a trace: per-image tags, image ids and label maps of the B images tile
over the C conditions of one batch, so every recorded number equals a separate run per condition."""

import numpy as np
import pandas as pd
import torch

from helpers import tiny_models as tm
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


def test_recorder_tags_ids_and_label_maps_tile_over_conditions_like_separate_runs():
    model = tm.unet2d()
    session = Session(model)
    x, t = tm.unet2d_inputs(2)
    labels = _label_maps()
    forward = lambda xt: model(*xt).sample  # noqa: E731

    batched = _recorder()  # one pass of 4 conditions x 2 images; element e is condition e // 2, image e % 2
    batched.set_tags(condition=[c for c in range(len(CONDITIONS)) for _ in IDS], dataset=DATASETS, image_ids=IDS)
    with session.trace(batched, labels=labels), torch.no_grad():
        eps = run_conditions(session, forward, (x, t), CONDITIONS)
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
