"""Recorder: statistics equal those of probabilities materialised by diffusers' classic attention;
streaming aggregates merge exactly; memory does not grow with images."""

import math

import numpy as np
import pytest
import torch

from helpers import tiny_models as tm
from diffcirc.processor import Recorder, Session

ATOL = 2e-5
MID = "mid_block.attentions.0"


def _oracle_unet2d(model, x, t, label_map):
    probs, spatial = tm.probe(model, lambda: model(x, t))
    values = {}
    for layer, p in probs.items():
        grid = spatial[layer]
        values[layer] = {
            "entropy": tm.oracle_entropy(p),
            "distance": tm.oracle_distance(p, grid),
            "label_mass": tm.oracle_label_mass(p, tm.oracle_token_labels(label_map, grid)),
        }
    return values


def _bins(x: np.ndarray, lo: float, hi: float, bins: int) -> np.ndarray:
    return np.clip(np.floor((x - lo) / (hi - lo) * bins), 0, bins - 1).astype(int)


def test_unet2d_statistics_match_materialised_probabilities():
    model = tm.unet2d()
    session = Session(model)
    x, t = tm.unet2d_inputs(2, hw=(16, 12))
    g = torch.Generator().manual_seed(5)
    label_map = torch.zeros(2, 16, 12, dtype=torch.long)
    label_map[:, 4:12, 2:9] = 1  # a "face" region
    label_map[1, :, 8:] = torch.randint(2, 4, (16, 4), generator=g)
    oracle = _oracle_unet2d(model, x, t, label_map)

    bins = 16
    rec = Recorder(bins=bins, per_image=True, maps={"layers": None, "images": None}, image_histograms=("entropy",))
    rec.set_tags(timestep=7, dataset="synthetic", image_ids=[10, 11])
    with session.trace(rec, labels=label_map), torch.no_grad():
        model(x, t)

    maps = rec.map_tensors()
    frame = rec.to_frame().set_index(["layer", "head", "stat"])
    hist = rec.histograms()
    per_image = rec.per_image_frame().set_index(["image", "layer", "head", "stat"])
    tags = (("timestep", 7), ("dataset", "synthetic"))
    assert len(maps) == 3 * 3 * 2 and list(rec.to_frame().columns[:2]) == ["timestep", "dataset"]
    for layer, stats in oracle.items():
        for stat, want in stats.items():  # want: (B, H, N) float64
            for b, image in enumerate((10, 11)):
                got = maps[(tags, image, layer, stat)]
                assert got.shape == (8, 8, 6)
                torch.testing.assert_close(got.double().reshape(8, -1), want[b], atol=ATOL, rtol=0)
                for h in range(8):
                    assert per_image.loc[(image, layer, h, stat), "mean"] == pytest.approx(want[b, h].mean().item(), abs=ATOL)
            for h in range(8):
                row = frame.loc[(layer, h, stat)]
                values = want[:, h].reshape(-1).numpy()
                assert row["count"] == values.size == 2 * 48
                assert row["mean"] == pytest.approx(values.mean(), abs=ATOL)
                assert row["std"] == pytest.approx(values.std(ddof=1), abs=ATOL)
                h_rows = hist[(hist["layer"] == layer) & (hist["head"] == h) & (hist["stat"] == stat)]
                lo, hi = h_rows.lo.iloc[0], h_rows.hi.iloc[-1]
                assert (lo, hi) == ((0.0, pytest.approx(math.log(48))) if stat == "entropy" else
                                    (0.0, pytest.approx(math.sqrt(2) if stat == "distance" else 1.0)))
                recorded = np.concatenate([maps[(tags, i, layer, stat)][h].reshape(-1).double().numpy() for i in (10, 11)])
                assert np.array_equal(h_rows["count"].to_numpy(), np.bincount(_bins(recorded, lo, hi, bins), minlength=bins))
                from_oracle = np.bincount(_bins(values, lo, hi, bins), minlength=bins)
                assert np.abs(h_rows["count"].to_numpy() - from_oracle).sum() <= 2  # values on a bin edge may move
    # each image's entropy histogram over a layer's 8 heads: the recorded maps' values binned, and
    # the materialised oracle's within values on a bin edge
    image_hist = rec.image_histogram_frame()
    assert set(image_hist.stat) == {"entropy"} and set(image_hist.image) == {10, 11}
    for layer in oracle:
        lo, hi = 0.0, math.log(48)
        for b, image in enumerate((10, 11)):
            g = image_hist[(image_hist.layer == layer) & (image_hist.image == image)]
            got = np.zeros(bins, dtype=int)
            got[g["bin"].to_numpy()] = g["count"].to_numpy()
            assert (g["count"] > 0).all() and got.sum() == 8 * 48
            recorded = maps[(tags, image, layer, "entropy")].reshape(-1).double().numpy()
            assert np.array_equal(got, np.bincount(_bins(recorded, lo, hi, bins), minlength=bins))
            from_oracle = np.bincount(_bins(oracle[layer]["entropy"][b].reshape(-1).numpy(), lo, hi, bins), minlength=bins)
            assert np.abs(got - from_oracle).sum() <= 2
    assert frame.xs("entropy", level="stat")["mean"].std() > 0.05  # heads differ: the comparison is not vacuous
    long = rec.maps_frame()
    assert len(long) == 3 * 3 * 2 * 8 * 48
    pick = long[(long["image"] == 11) & (long["layer"] == MID) & (long["head"] == 5) & (long["stat"] == "distance")]
    cell = pick[(pick["row"] == 3) & (pick["col"] == 4)]
    assert cell["query"].item() == 3 * 6 + 4 and cell["value"].item() == maps[(tags, 11, MID, "distance")][5, 3, 4].item()


def test_cond_unet_cross_attention_entropy_respects_text_padding_mask():
    model = tm.cond_unet()
    session = Session(model)
    x, t, enc, mask = tm.cond_inputs(2)
    probs, _ = tm.probe(model, lambda: model(x, t, enc, encoder_attention_mask=mask))
    rec = Recorder(stats=("entropy", "distance"), maps={"layers": None, "images": None})
    rec.set_tags(image_ids=[0, 1])
    with session.trace(rec), torch.no_grad():
        model(x, t, enc, encoder_attention_mask=mask)
    maps = rec.map_tensors()
    grids = {i.name: i.grid for i in session.layers}
    for layer, p in probs.items():
        for b in range(2):
            got = maps[((), b, layer, "entropy")].double().reshape(p.shape[1], -1)
            torch.testing.assert_close(got, tm.oracle_entropy(p)[b], atol=ATOL, rtol=0)
            if layer.endswith("attn1"):
                got = maps[((), b, layer, "distance")].double().reshape(p.shape[1], -1)
                torch.testing.assert_close(got, tm.oracle_distance(p, grids[layer])[b], atol=ATOL, rtol=0)
            else:
                assert ((), b, layer, "distance") not in maps
    # element 1 sees 5 of 7 text tokens: its cross-attention entropy is bounded by ln 5
    cross = [k for k in maps if k[2].endswith("attn2") and k[1] == 1]
    assert cross and all(maps[k].max() <= math.log(5) + 1e-5 for k in cross)


def _random_batches(n: int, heads: int = 3, queries: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [{"entropy": torch.rand(2, heads, queries, generator=g) * 3,
             "distance": torch.rand(2, heads, queries, generator=g)} for _ in range(n)]


def _feed(rec, batches, first_id=0):
    for i, values in enumerate(batches):
        rec.set_tags(timestep=i % 2, condition=["clean", "ablated"], image_ids=[first_id + 2 * i, first_id + 2 * i + 1])
        rec.record("layer.a", 20, (2, 5), values)


def test_aggregates_match_numpy_and_per_element_tags_split_rows():
    batches = _random_batches(4)
    rec = Recorder(stats=("entropy", "distance"), bins=5)
    _feed(rec, batches)
    frame = rec.to_frame()
    assert list(frame.columns) == ["timestep", "condition", "layer", "head", "stat", "count", "mean", "std", "m2"]
    row = frame.query("timestep == 1 and condition == 'ablated' and head == 2 and stat == 'distance'").iloc[0]
    values = torch.cat([batches[i]["distance"][1, 2] for i in (1, 3)]).double().numpy()
    assert row["count"] == 20
    assert row["mean"] == pytest.approx(values.mean(), abs=1e-12)
    assert row["m2"] == pytest.approx(((values - values.mean()) ** 2).sum(), abs=1e-10)
    hist = rec.histograms().query("timestep == 1 and condition == 'ablated' and head == 2 and stat == 'distance'")
    assert hist["count"].tolist() == np.bincount(_bins(values, 0, math.sqrt(2), 5), minlength=5).tolist()


def test_merge_equals_single_pass():
    batches = _random_batches(5, seed=3)
    kwargs = {"stats": ("entropy", "distance"), "bins": 7, "per_image": True, "image_histograms": ("distance",)}
    single = Recorder(**kwargs)
    _feed(single, batches)
    a, b = Recorder(**kwargs), Recorder(**kwargs)
    _feed(a, batches[:2])
    _feed(b, batches[2:], first_id=4)
    merged = a.merge(b)
    s, m = single.to_frame(), merged.to_frame()
    keys = ["timestep", "condition", "layer", "head", "stat"]
    s, m = s.sort_values(keys).reset_index(drop=True), m.sort_values(keys).reset_index(drop=True)
    assert s[keys + ["count"]].equals(m[keys + ["count"]])
    np.testing.assert_allclose(m[["mean", "std", "m2"]].to_numpy(), s[["mean", "std", "m2"]].to_numpy(), rtol=1e-12)
    hs = single.histograms().sort_values(keys + ["bin"]).reset_index(drop=True)
    hm = merged.histograms().sort_values(keys + ["bin"]).reset_index(drop=True)
    assert hs.equals(hm)
    ps = single.per_image_frame().sort_values(["image", "layer", "head", "stat"]).reset_index(drop=True)
    pm = merged.per_image_frame().sort_values(["image", "layer", "head", "stat"]).reset_index(drop=True)
    assert ps.equals(pm)
    order = ["timestep", "condition", "image", "layer", "bin"]
    assert single.image_histogram_frame().sort_values(order).reset_index(drop=True).equals(
        merged.image_histogram_frame().sort_values(order).reset_index(drop=True))
    with pytest.raises(ValueError, match="image_histograms"):
        a.merge(Recorder(stats=("entropy", "distance"), bins=7, per_image=True))


def test_memory_does_not_grow_with_images():
    rec = Recorder(stats=("entropy", "distance"), bins=32)
    batches = _random_batches(12, seed=4)
    _feed(rec, batches[:2])
    after_two = rec.nbytes()
    _feed(rec, batches[2:], first_id=100)
    assert after_two > 0 and rec.nbytes() == after_two
    assert int(rec.to_frame()["count"].sum()) == 12 * 2 * 3 * 10 * 2  # every query of every image was counted
    growing = Recorder(stats=("entropy",), per_image=True)
    _feed(growing, batches[:2])
    small = growing.nbytes()
    _feed(growing, batches[2:], first_id=100)
    assert growing.nbytes() > small  # per-image means are the documented exception


def test_per_image_needs_image_ids_and_reserved_tags_raise():
    rec = Recorder(per_image=True)
    rec.set_tags(timestep=1)
    with pytest.raises(ValueError, match="image_ids"):
        rec.record("l", 4, (2, 2), {"entropy": torch.zeros(1, 2, 4)})
    with pytest.raises(ValueError, match="reserved"):
        rec.set_tags(layer=3)
    with pytest.raises(ValueError, match="subset"):
        Recorder(stats=("lse",))
    with pytest.raises(ValueError, match="subset of the recorded stats"):
        Recorder(stats=("entropy",), image_histograms=("distance",))
    with pytest.raises(ValueError, match="image_ids"):
        rec = Recorder(stats=("entropy",), image_histograms=("entropy",))
        rec.set_tags(timestep=1)
        rec.record("l", 4, (2, 2), {"entropy": torch.zeros(1, 2, 4)})
    with pytest.raises(ValueError, match="image_histograms"):
        Recorder(stats=("entropy",)).image_histogram_frame()


def test_label_map_tiles_over_a_larger_forward_batch():
    model = tm.unet2d()
    session = Session(model)
    x, t = tm.unet2d_inputs(1)
    label_map = torch.zeros(1, 16, 16, dtype=torch.long)
    label_map[:, :, 8:] = 1
    rec = Recorder(stats=("label_mass",))
    with session.trace(rec, labels=label_map), torch.no_grad():
        model(x.repeat(2, 1, 1, 1), t.repeat(2))  # e.g. classifier-free guidance's [uncond, cond]
    frame = rec.to_frame()
    assert (frame["count"] == 2 * 64).all() and frame["mean"].between(0, 1).all()


def test_sequences_shorter_than_the_batch_tile_element_e_to_value_e_mod_len():
    rec = Recorder(stats=("distance",), bins=4, per_image=True)
    rec.set_tags(dataset=["a", "b"], image_ids=[7, 8])  # a batch of 4: two copies of two images
    rec.record("l", 4, (1, 3), {"distance": torch.arange(4.0).view(4, 1, 1).expand(4, 1, 3)})
    frame = rec.to_frame().set_index("dataset")
    assert frame.loc["a", "count"] == 6 and frame.loc["a", "mean"] == 1.0  # elements 0 and 2: values 0 and 2
    assert frame.loc["b", "count"] == 6 and frame.loc["b", "mean"] == 2.0  # elements 1 and 3: values 1 and 3
    per_image = rec.per_image_frame()
    assert per_image[["dataset", "image", "mean"]].values.tolist() == [["a", 7, 1.0], ["b", 8, 2.0]]


def _numpy_moments(values: np.ndarray, lo: float, hi: float, bins: int) -> dict:
    """count, mean, std (ddof 1), m2 and bin counts of float64 samples, by the documented binning."""
    idx = np.clip(np.floor((values - lo) * (bins / (hi - lo))), 0, bins - 1).astype(int)
    mean = values.mean()
    return {"count": values.size, "mean": mean, "std": values.std(ddof=1), "m2": ((values - mean) ** 2).sum(),
            "hist": np.bincount(idx, minlength=bins)}


def test_merges_of_unequal_batch_sizes_equal_numpy_on_the_concatenated_samples():
    g = torch.Generator().manual_seed(11)
    # batch sizes 1, 4, 3 and 6, each batch around its own level, so the merge's cross term matters
    batches = [torch.rand(b, 3, 10, generator=g) * 0.5 + level for b, level in ((1, 0.2), (4, 1.0), (3, 2.1), (6, 0.6))]
    parts = [Recorder(stats=("entropy",), bins=6) for _ in range(3)]
    for rec, chunk in zip(parts, (batches[:2], batches[2:3], batches[3:])):
        for x in chunk:
            rec.record("layer.a", 20, None, {"entropy": x})
    merged = parts[0].merge(parts[1]).merge(parts[2])
    lo, hi = 0.0, math.log(20)
    frame = merged.to_frame().set_index("head")
    hist = merged.histograms()
    for h in range(3):
        want = _numpy_moments(torch.cat([x[:, h].reshape(-1) for x in batches]).double().numpy(), lo, hi, 6)
        row = frame.loc[h]
        assert row["count"] == want["count"] == 140
        assert row["mean"] == pytest.approx(want["mean"], abs=1e-12)
        assert row["m2"] == pytest.approx(want["m2"], abs=1e-10)
        assert row["std"] == pytest.approx(want["std"], abs=1e-12)
        assert hist[hist["head"] == h]["count"].tolist() == want["hist"].tolist()
