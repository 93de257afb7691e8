"""Helpers of the phases against hand-computed values."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from diffcirc.analysis.config import AnalysisConfig
from diffcirc.analysis.phases import Experiment, uniform_label_shares
from helpers.analysis_models import save_analysis_unet


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


def test_x0_from_eps_inverts_the_noising_with_hand_computed_coefficients():
    # alpha_bar = 0.36 at t = 1: x_t = 0.6 x0 + 0.8 eps, so x0 = (x_t - 0.8 eps) / 0.6
    schedule = SimpleNamespace(alphas=torch.tensor([0.9, 0.36]))
    x0 = torch.tensor([[0.5, -1.0], [0.25, 0.0]])
    eps = torch.tensor([[1.0, 2.0], [-0.5, 1.5]])
    x_t = 0.6 * x0 + 0.8 * eps
    got = Experiment.x0_from_eps(schedule, x_t, eps, 1)
    assert got.flatten().tolist() == pytest.approx(x0.flatten().tolist(), abs=1e-6)
    # a wrong eps_hat moves x0_hat by -(0.8 / 0.6) times the error
    moved = Experiment.x0_from_eps(schedule, x_t, eps + 0.3, 1)
    assert (moved - x0).flatten().tolist() == pytest.approx([-0.4] * 4, abs=1e-6)


def test_errors_clamp_the_predicted_image_to_the_data_range():
    # constant predictions of a zero image: 0.5 stays (part error 0.25), 3.0 is clamped to 1 (part
    # error 1, not 9), -0.5 stays (0.25); eps_mse is the mean squared difference, by hand
    size = 4
    x0 = torch.zeros(3, 3, size, size)
    x0_hat = torch.stack([torch.full((3, size, size), v) for v in (0.5, 3.0, -0.5)])
    labels = torch.zeros(3, size, size, dtype=torch.long)
    eps = torch.zeros(3, 3, size, size)
    eps_hat = torch.stack([torch.full((3, size, size), v) for v in (1.0, -2.0, 0.0)])
    err = Experiment.errors(eps_hat, eps, x0_hat, x0, labels)
    assert set(err) == {"eps_mse", "edge", "high_freq", "part"}
    assert err["eps_mse"].tolist() == pytest.approx([1.0, 4.0, 0.0], abs=1e-12)
    assert err["part"].tolist() == pytest.approx([0.25, 1.0, 0.25], abs=1e-6)
    assert err["edge"].tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-6)


@pytest.fixture(scope="module")
def tiny_experiment(tmp_path_factory, single_thread):
    """An Experiment on a tiny random UNet with 2 images per dataset and one ablation timestep."""
    model_dir = save_analysis_unet(tmp_path_factory.mktemp("tiny-unet"))
    config = AnalysisConfig(model=str(model_dir), synthetic=2, natural_n=2, timesteps=[600],
                            ablation_timesteps=[600], ablation_images=2)
    return Experiment(config)


@pytest.mark.parametrize("modes", [("zero",), ("mean",), ("zero", "mean")])
def test_ablations_run_each_requested_mode_once_per_head_dataset_and_image(tiny_experiment, modes):
    exp = tiny_experiment
    exp.c = dataclasses.replace(exp.c, ablation_modes=modes)
    exp.ablations()
    abl = exp.tables["ablations"]
    per_mode = len(exp.heads) * 2 * 2  # heads x datasets x images
    assert abl.groupby("mode").size().to_dict() == {mode: per_mode for mode in modes}
