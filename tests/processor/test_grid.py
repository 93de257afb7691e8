"""grid: batches tile (element e is image e % b, never e // k), labels resample to token centres
as torch's nearest-exact interpolation does, and the power-of-two grid rule on odd sizes."""

import pytest
import torch

from helpers import tiny_models as tm
from diffcirc.processor.grid import infer_grid, labels_to_grid, sample_size_hw, tile_batch


def test_tile_batch_repeats_the_whole_block_not_each_row():
    t = torch.tensor([[1, 2], [3, 4]])
    assert tile_batch(t, 6, "labels").tolist() == [[1, 2], [3, 4], [1, 2], [3, 4], [1, 2], [3, 4]]
    assert tile_batch(t, 2, "labels") is t
    with pytest.raises(ValueError, match=r"labels: has 2 rows, but the forward pass has batch 5"):
        tile_batch(t, 5, "labels")
    with pytest.raises(ValueError, match="has 0 rows"):
        tile_batch(t[:0], 4, "labels")


@pytest.mark.parametrize("grid", [(8, 5), (4, 3), (15, 9), (2, 2), (1, 1), (20, 11)], ids=str)
def test_labels_to_grid_equals_nearest_exact_interpolation(grid):
    g = torch.Generator().manual_seed(4)
    label_map = torch.randint(0, 50, (2, 15, 9), generator=g)
    got = labels_to_grid(label_map, grid)
    assert got.dtype == torch.int64 and got.shape == (2, grid[0] * grid[1])
    assert torch.equal(got, tm.oracle_token_labels(label_map, grid))


def test_labels_to_grid_refuses_float_or_unbatched_maps():
    with pytest.raises(ValueError, match="integer tensor"):
        labels_to_grid(torch.zeros(1, 4, 4), (2, 2))
    with pytest.raises(ValueError, match="integer tensor"):
        labels_to_grid(torch.zeros(4, 4, dtype=torch.long), (2, 2))


def test_infer_grid_halves_odd_sides_with_ceil():
    # 15 x 9 -> 8 x 5 -> 4 x 3 -> 2 x 2 -> 1 x 1
    for n, grid in ((135, (15, 9)), (40, (8, 5)), (12, (4, 3)), (4, (2, 2)), (1, (1, 1))):
        assert infer_grid(n, (15, 9)) == grid
    with pytest.raises(ValueError, match="no power-of-two"):
        infer_grid(10, (15, 9))


def test_sample_size_hw_reads_int_or_pair():
    class Config:
        sample_size = 32

    assert sample_size_hw(Config()) == (32, 32)
    Config.sample_size = [24, 40]
    assert sample_size_hw(Config()) == (24, 40)
    Config.sample_size = None
    assert sample_size_hw(Config()) is None and sample_size_hw(None) is None
