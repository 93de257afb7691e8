"""Helpers of the phases against hand-computed values."""

import pytest
import torch

from diffcirc.analysis.phases import uniform_label_shares


def test_uniform_label_shares_of_region_maps():
    # under uniform attention a query's same-label mass is the share n_c / N of tokens carrying its
    # label c; averaged over the queries that is sum_c (n_c / N)^2
    labels = torch.zeros(2, 8, 8, dtype=torch.long)
    labels[0, :, :2] = 1       # two regions: 16 and 48 of 64 pixels
    labels[1, :4] = 3          # three regions: the top half (32), bottom-left (16), bottom-right (16)
    labels[1, 4:, 4:] = 5
    expected = [(16 / 64) ** 2 + (48 / 64) ** 2, 0.5 ** 2 + 0.25 ** 2 + 0.25 ** 2]
    assert expected == [0.625, 0.375]
    assert uniform_label_shares(labels, (8, 8)).tolist() == pytest.approx(expected, abs=1e-15)
    # a 4x4 token grid samples pixel (2r + 1, 2c + 1): the same regions, a quarter of the tokens
    assert uniform_label_shares(labels, (4, 4)).tolist() == pytest.approx(expected, abs=1e-15)
    # a one-region map: every key carries the query's label
    assert uniform_label_shares(torch.full((1, 8, 8), 2), (2, 2)).tolist() == [1.0]
