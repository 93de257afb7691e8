"""Image maps and role errors against numpy and against values worked out by hand on tiny images."""

import numpy as np
import pytest
import torch

from diffcirc.analysis import image_maps


def _gray(values) -> torch.Tensor:
    """(B, S, S) luminance values -> (B, 3, S, S) images with that luminance (the BT.601 weights sum to 1)."""
    x = torch.as_tensor(np.asarray(values), dtype=torch.float64)
    return x[:, None].expand(-1, 3, -1, -1).contiguous()


def _step(size: int, at: int) -> np.ndarray:
    """(S, S): -1 left of column ``at``, +1 from it on."""
    img = -np.ones((size, size))
    img[:, at:] = 1.0
    return img


def _checkerboard(size: int) -> np.ndarray:
    r, c = np.indices((size, size))
    return np.where((r + c) % 2 == 0, 1.0, -1.0)


def test_luminance_uses_bt601_weights():
    img = torch.zeros(1, 3, 2, 2, dtype=torch.float64)
    img[0, 0], img[0, 1], img[0, 2] = 1.0, 0.5, -1.0
    np.testing.assert_allclose(image_maps.luminance(img)[0, 0], np.full((2, 2), 0.299 + 0.5 * 0.587 - 0.114))


def test_pearson_rows_equals_numpy_corrcoef():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 4, 25))
    b = 0.5 * a + rng.normal(size=(3, 4, 25))
    b[0, 0] = -a[0, 0] + 2.0  # a perfect anticorrelation keeps its sign
    got = image_maps.pearson_rows(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    want = np.array([[np.corrcoef(a[i, j], b[i, j])[0, 1] for j in range(4)] for i in range(3)])
    assert got.shape == (3, 4)
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert got[0, 0] == pytest.approx(-1.0)
    flat = image_maps.pearson_rows(torch.ones(2, 9, dtype=torch.float64), torch.from_numpy(a[0, :2, :9]))
    assert flat.tolist() == [0.0, 0.0]


def test_sobel_edge_sits_on_the_step_with_the_hand_computed_value():
    # The Sobel x kernel sums 1, 2, 1 times (right - left) neighbour: 4 * (1 - (-1)) = 8 on the two
    # columns either side of the step, 0 elsewhere (replicate padding adds no edge at the border).
    size, at = 8, 3
    edges = image_maps.edge_magnitude(_gray([_step(size, at), _step(size, at).T]))
    want = np.zeros((size, size))
    want[:, [at - 1, at]] = 8.0
    assert edges.shape == (2, size, size)
    np.testing.assert_allclose(edges[0], want, atol=1e-12)
    np.testing.assert_allclose(edges[1], want.T, atol=1e-12)
    assert image_maps.edge_magnitude(_gray([np.full((size, size), 0.3)])).abs().max() < 1e-12


def test_texture_energy_of_a_checkerboard_and_a_flat_image():
    # A 5x5 box over a +-1 checkerboard holds 13 of the centre's sign and 12 of the other: local mean
    # = centre / 25, so high-pass = 24/25 * centre and its energy (24/25)^2 wherever the 5x5 blur
    # and the 7x7 energy window stay clear of the border (5 pixels in).
    size = 16
    board = _gray([_checkerboard(size)])
    hp = image_maps.high_pass(board)[0].numpy()
    np.testing.assert_allclose(hp[2:-2, 2:-2], 24 / 25 * _checkerboard(size)[2:-2, 2:-2], atol=1e-12)
    energy = image_maps.texture_energy(board)[0].numpy()
    np.testing.assert_allclose(energy[5:-5, 5:-5], (24 / 25) ** 2, atol=1e-12)
    assert image_maps.texture_energy(_gray([np.full((size, size), -0.4)])).abs().max() < 1e-15


def test_texture_and_edge_maps_correlate_positively_with_where_they_are():
    # Left half textured, right half flat: on a 2x2 token grid the texture map is high in the left
    # tokens, so a map that is high on the left correlates +1 and one high on the right -1.
    size = 16
    img = np.zeros((size, size))
    img[:, : size // 2] = _checkerboard(size)[:, : size // 2]
    texture = image_maps.to_grid(image_maps.texture_energy(_gray([img])), (2, 2))
    left = torch.tensor([[1.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    assert texture[0, 0] > texture[0, 1] and texture[0, 2] > texture[0, 3]
    assert image_maps.pearson_rows(left, texture).item() == pytest.approx(1.0)
    assert image_maps.pearson_rows(1.0 - left, texture).item() == pytest.approx(-1.0)
    edges = image_maps.to_grid(image_maps.edge_magnitude(_gray([_step(size, 4)])), (1, 2))
    assert image_maps.pearson_rows(torch.tensor([[1.0, 0.0]], dtype=torch.float64), edges).item() == pytest.approx(1.0)


def test_to_grid_averages_blocks_row_major():
    maps = torch.arange(16, dtype=torch.float64).reshape(1, 4, 4)
    np.testing.assert_allclose(image_maps.to_grid(maps, (2, 2)), [[2.5, 4.5, 10.5, 12.5]])
    # A 2 x 4 grid averages row pairs and keeps every column: rows first, as diffusers flattens tokens.
    np.testing.assert_allclose(image_maps.to_grid(maps, (2, 4)), [[2, 3, 4, 5, 10, 11, 12, 13]])
    assert image_maps.to_grid(torch.zeros(3, 8, 8), (4, 2)).shape == (3, 8)


def test_region_average_on_a_two_region_map():
    img = torch.arange(16, dtype=torch.float64).reshape(1, 1, 4, 4)
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, :, 2:] = 1  # left two columns region 0 (mean 6.5), right two region 1 (mean 8.5)
    want = np.where(np.arange(4) < 2, 6.5, 8.5)[None].repeat(4, axis=0)
    np.testing.assert_allclose(image_maps.region_average(img, labels)[0, 0], want)


def test_role_errors_on_constructed_images():
    size = 8
    labels = torch.zeros(3, size, size, dtype=torch.long)
    labels[:, :, size // 2:] = 1
    x0 = _gray([np.zeros((size, size))] * 3)
    # Image 0: a constant offset c moves only the region means (edge and detail unchanged): part = c^2.
    # Image 1: a step adds edges of 8 on 2 of 8 columns: edge MSE = 64 * 2 / 8 = 16.
    #   Its region means are -0.5 (three -1 columns, one +1) and 1: part = (0.25 + 1) / 2 = 0.625.
    # Image 2: a checkerboard has mean 0 in each (even-sized) region: part error 0; its high-pass is
    #   24/25 of it on the 4x4 interior at least (see the texture test), a lower bound for high_freq.
    pred = _gray([np.full((size, size), 0.5), _step(size, 3), _checkerboard(size)])
    err = image_maps.role_errors(pred, x0, labels)
    assert set(err) == {"edge", "high_freq", "part"} and all(v.shape == (3,) for v in err.values())
    np.testing.assert_allclose(err["part"], [0.25, 0.625, 0.0], atol=1e-12)
    np.testing.assert_allclose(err["edge"][:2], [0.0, 16.0], atol=1e-12)
    assert err["high_freq"][0] == pytest.approx(0.0, abs=1e-12)
    assert err["high_freq"][2] >= (24 / 25) ** 2 * 16 / 64
    same = image_maps.role_errors(x0, x0, labels)
    assert all(float(v.abs().max()) == 0.0 for v in same.values())
