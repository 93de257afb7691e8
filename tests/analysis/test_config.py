"""AnalysisConfig: the defaults the CLI reads, the rules that resolve the fields left None, the
settings a folder is resumed under, and noise seeded per image."""

import pytest
import torch

from diffcirc.analysis.config import DEFAULT_TIMESTEP_COUNT, AnalysisConfig, noise_for

GRID = [50, 150, 250, 350, 450, 550, 650, 750, 850, 950]


def test_timesteps_left_none_take_the_models_grid_and_given_ones_stay():
    asked = []

    def grid(n):
        asked.append(n)
        return [float(t) for t in GRID]  # a flow model's grid: floats, stored as the int timesteps
    assert AnalysisConfig().with_timesteps(grid).timesteps == GRID and asked == [DEFAULT_TIMESTEP_COUNT]
    given = AnalysisConfig(timesteps=[600])
    assert given.with_timesteps(grid) is given and asked == [DEFAULT_TIMESTEP_COUNT]


def test_ablation_timesteps_need_the_trace_grid_resolved():
    with pytest.raises(ValueError, match="with_timesteps"):
        AnalysisConfig().resolved_ablation_timesteps()


@pytest.mark.parametrize("natural, spec", [("lfw", "synthetic-gray"), ("photos", "synthetic-gray"),
                                           ("folder:faces", "synthetic-gray"), ("celeba:data/celeba", "synthetic")])
def test_synthetic_spec_matches_the_natural_dataset(natural, spec):
    assert AnalysisConfig(natural=natural).synthetic_spec == spec


def test_synthetic_spec_given_is_kept():
    assert AnalysisConfig(natural="celeba:data/celeba", synthetic_spec="synthetic-gray").synthetic_spec == "synthetic-gray"
    assert AnalysisConfig(natural="lfw", synthetic_spec="synthetic").synthetic_spec == "synthetic"


def test_defaults_are_the_fields_before_resolution():
    defaults = AnalysisConfig.defaults()
    assert defaults["synthetic_spec"] is None and defaults["timesteps"] is None
    assert defaults["synthetic"] == 64 and defaults["ablation_images"] == 32 and defaults["wait"] is False
    assert AnalysisConfig(**defaults) == AnalysisConfig()


def test_ablation_and_circuit_timesteps_resolve_from_the_grid():
    config = AnalysisConfig(timesteps=GRID)
    assert config.resolved_ablation_timesteps() == [150, 450, 750]  # every third, from the second
    assert config.resolved_circuit_timestep() == 450                # the middle one
    assert AnalysisConfig(timesteps=[600]).resolved_ablation_timesteps() == [600]
    assert AnalysisConfig(timesteps=GRID, ablation_timesteps=[100, 300, 500, 700]).resolved_circuit_timestep() == 500
    assert AnalysisConfig(timesteps=GRID, circuit_timestep=300).resolved_circuit_timestep() == 300


def test_settings_leave_out_where_and_whether_to_wait():
    here, there = AnalysisConfig(out="a"), AnalysisConfig(out="b", wait=True)
    assert here.settings() == there.settings()
    assert "out" not in here.settings() and "wait" not in here.settings()
    assert AnalysisConfig(seed=1).settings() != here.settings()
    assert here.settings()["synthetic_spec"] == "synthetic-gray"  # resolved: folders of either spelling agree
    assert AnalysisConfig(synthetic_spec="synthetic-gray").settings() == here.settings()


def test_noise_is_seeded_per_image():
    # noise is seeded per image, so a recomputation of one table row matches exactly
    a = noise_for(0, 1, [3, 5], 600, (3, 8, 8))
    b = noise_for(0, 1, [5], 600, (3, 8, 8))
    assert torch.equal(a[1], b[0])
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(noise_for(0, 0, [5], 600, (3, 8, 8))[0], b[0])  # the dataset seeds it
    assert not torch.equal(noise_for(0, 1, [5], 100, (3, 8, 8))[0], b[0])  # and the timestep
    assert not torch.equal(noise_for(1, 1, [5], 600, (3, 8, 8))[0], b[0])  # and the seed


def test_circuit_ablation_is_zero_unless_mean_and_nothing_else():
    assert AnalysisConfig().circuit_ablation == "zero"
    assert AnalysisConfig(circuit_ablation="mean").settings()["circuit_ablation"] == "mean"
    with pytest.raises(ValueError, match="circuit_ablation"):
        AnalysisConfig(circuit_ablation="resample")
