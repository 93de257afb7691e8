"""Recorder.all_reduce over two gloo processes equals one recorder that saw every pass, also when
one process has no data at all; torchrun's device and memory rules of ``Ranks``."""

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from diffcirc.analysis.distributed import Ranks
from diffcirc.processor.recorder import Recorder

N_BATCHES = 6


def _batches():
    g = torch.Generator().manual_seed(0)
    return [(torch.rand(2, 3, 16, generator=g) * 2.5, [2 * i, 2 * i + 1]) for i in range(N_BATCHES)]


def _recorder():
    return Recorder(stats=("entropy",), bins=8, per_image=True, maps={"images": [0, 1, 5], "stats": ["entropy"]})


def _fill(rec, batches):
    for i, (x, ids) in batches:
        rec.set_tags(timestep=i % 2, image_ids=ids)
        rec.record("layer0", 16, (4, 4), {"entropy": x})


def _frames(rec):
    order = lambda f: f.sort_values([c for c in f.columns if c not in ("mean", "std", "m2", "value", "count")]  # noqa: E731
                                    ).reset_index(drop=True)
    return [order(rec.to_frame()), order(rec.histograms()), order(rec.per_image_frame()), order(rec.maps_frame())]


def _worker(rank, world, init, split):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        batches = list(enumerate(_batches()))
        mine = [b for b in batches if (b[0] % world == rank if split == "strided" else rank == 0)]
        rec = _recorder()
        _fill(rec, mine)
        rec.all_reduce()
        one = _recorder()
        _fill(one, batches)
        for got, want in zip(_frames(rec), _frames(one)):
            pd.testing.assert_frame_equal(got, want, rtol=1e-12, atol=1e-12)
        with pytest.raises(RuntimeError, match="already called"):
            rec.all_reduce()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("split", ["strided", "all_on_rank0"])
def test_all_reduce_equals_one_recorder(tmp_path, split):
    mp.spawn(_worker, args=(2, f"file://{tmp_path / 'store'}", split), nprocs=2, join=True)


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
