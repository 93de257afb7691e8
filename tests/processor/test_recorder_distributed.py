"""Recorder.all_reduce over two gloo processes equals numpy on the concatenated samples of every
process, and one recorder that saw every pass, also when one process has no data at all;
torchrun's device and memory rules of ``Ranks``."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from diffcirc.analysis.distributed import Ranks
from diffcirc.processor.recorder import Recorder

N_BATCHES = 6
BINS = 8
MAP_IMAGES = (0, 1, 5)


def _batches():
    g = torch.Generator().manual_seed(0)
    return [(torch.rand(2, 3, 16, generator=g) * 2.5, [2 * i, 2 * i + 1]) for i in range(N_BATCHES)]


def _recorder():
    maps = {"images": list(MAP_IMAGES), "stats": ["entropy"]}
    return Recorder(stats=("entropy",), bins=BINS, per_image=True, maps=maps, image_histograms=("entropy",))


def _fill(rec, batches):
    for i, (x, ids) in batches:
        rec.set_tags(timestep=i % 2, image_ids=ids)
        rec.record("layer0", 16, (4, 4), {"entropy": x})


def _frames(rec):
    order = lambda f: f.sort_values([c for c in f.columns if c not in ("mean", "std", "m2", "value", "count")]  # noqa: E731
                                    ).reset_index(drop=True)
    return [order(rec.to_frame()), order(rec.histograms()), order(rec.per_image_frame()), order(rec.maps_frame()),
            order(rec.image_histogram_frame())]


def _share(batches, rank, world, split):
    """The (index, batch) pairs process rank records."""
    return [b for b in batches if (b[0] % world == rank if split == "strided" else rank == 0)]


def _assert_equals_numpy(rec, per_rank):
    """rec against numpy on the concatenation of every process's samples (timestep = batch index % 2)."""
    samples = [(i % 2, x.double().numpy(), ids) for share in per_rank for i, (x, ids) in share]
    lo, hi = 0.0, math.log(16)
    frame = rec.to_frame().set_index(["timestep", "head"])
    hist = rec.histograms().set_index(["timestep", "head"])
    assert len(frame) == 2 * 3
    for (timestep, h), row in frame.iterrows():
        values = np.concatenate([x[:, h].ravel() for ts, x, _ in samples if ts == timestep])
        mean = values.mean()
        assert row["count"] == values.size == N_BATCHES // 2 * 2 * 16
        assert row["mean"] == pytest.approx(mean, abs=1e-12)
        assert row["m2"] == pytest.approx(((values - mean) ** 2).sum(), abs=1e-10)
        assert row["std"] == pytest.approx(values.std(ddof=1), abs=1e-12)
        idx = np.clip(np.floor((values - lo) * (BINS / (hi - lo))), 0, BINS - 1).astype(int)
        assert hist.loc[(timestep, h), "count"].tolist() == np.bincount(idx, minlength=BINS).tolist()
    per_image = rec.per_image_frame()
    want = {(ts, image, h): x[e, h].mean() for ts, x, ids in samples for e, image in enumerate(ids) for h in range(3)}
    assert len(per_image) == len(want) == 2 * N_BATCHES * 3
    for row in per_image.itertuples():
        assert row.mean == pytest.approx(want[(row.timestep, row.image, row.head)], abs=1e-12)
    # each image's histogram over its 3 heads' queries, nonzero bins only
    got = rec.image_histogram_frame().groupby(["timestep", "image"])
    assert got.ngroups == 2 * N_BATCHES
    for (ts, image), g in got:
        x = next(x[e] for t, x, ids in samples for e, i in enumerate(ids) if (t, i) == (ts, image))
        idx = np.clip(np.floor((x.ravel() - lo) * (BINS / (hi - lo))), 0, BINS - 1).astype(int)
        counts = np.bincount(idx, minlength=BINS)
        assert dict(zip(g["bin"], g["count"])) == {b: c for b, c in enumerate(counts) if c}
    maps = rec.map_tensors()
    want = {(ts, image): x[e] for ts, x, ids in samples for e, image in enumerate(ids) if image in MAP_IMAGES}
    assert len(maps) == len(want) == len(MAP_IMAGES)
    for (ts, image), x in want.items():
        got = maps[((("timestep", ts),), image, "layer0", "entropy")]
        np.testing.assert_array_equal(got.numpy(), x.astype(np.float32).reshape(3, 4, 4))


SPLITS = ("strided", "all_on_rank0")


def _check_split(rank, world, split):
    batches = list(enumerate(_batches()))
    rec = _recorder()
    _fill(rec, _share(batches, rank, world, split))
    rec.all_reduce()
    _assert_equals_numpy(rec, [_share(batches, r, world, split) for r in range(world)])
    one = _recorder()
    _fill(one, batches)
    for got, want in zip(_frames(rec), _frames(one)):
        pd.testing.assert_frame_equal(got, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="already called"):
        rec.all_reduce()


def _worker(rank, world, init, done):
    """Checks every split in one process group; a failure ends this process (and the launch), naming
    its split, so the ranks never run out of step."""
    torch.set_num_threads(1)  # a forked child: OpenMP's thread pool did not survive the fork
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        for split in SPLITS:
            try:
                _check_split(rank, world, split)
            except BaseException as e:
                raise AssertionError(f"split {split!r}, rank {rank}: {e!r}") from e
            (done / f"{split}.{rank}").touch()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def all_reduce_launch(tmp_path_factory):
    """One launch of two gloo processes that check every split; returns the folder of their
    "<split>.<rank>" marks of splits that passed. Starting processes is the cost of these tests:
    they are forked copies of this one, which need no second import of torch and this module."""
    done = tmp_path_factory.mktemp("all_reduce")
    mp.start_processes(_worker, args=(2, f"file://{done / 'store'}", done), nprocs=2, join=True, start_method="fork")
    return done


@pytest.mark.parametrize("split", SPLITS)
def test_all_reduce_equals_one_recorder(all_reduce_launch, split):
    assert sorted(p.name for p in all_reduce_launch.glob(f"{split}.*")) == [f"{split}.0", f"{split}.1"]


def test_ranks_give_each_process_its_own_gpu_and_share_host_memory(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    ranks = Ranks(rank=3, world=8)
    assert ranks.device("cuda") == "cuda:3" and ranks.device("cpu") == "cpu"
    with pytest.raises(ValueError, match="use --device cuda"):
        ranks.device("cuda:0")
    assert ranks.per_host == 4
    assert Ranks().per_host == 1 and Ranks().device("cuda:1") == "cuda:1"
    assert ranks.shard(range(10)) == [3]


def test_single_process_collectives_are_the_identity():
    ranks = Ranks()
    assert ranks.all_gather(5) == [5] and ranks.broadcast("x") == "x"
    assert ranks.on_main(lambda: 7) == 7
    with pytest.raises(KeyError):
        ranks.on_main(lambda: {}["missing"])
