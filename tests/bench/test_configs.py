"""diffcirc.bench.configs: the UNet and sweep configurations, their defaults and --quick sizes."""

import dataclasses

import pytest

from diffcirc.bench import configs


def test_unet_defaults_and_quick():
    full = configs.unet_config()
    assert (full.latent, full.widths, full.unet_batch, full.repeats) == (64, (320, 640), 16, 5)
    assert full.impl == configs.UNET_IMPLEMENTATIONS and full.impl[0] == "sdpa"
    quick = configs.unet_config(quick=True)
    assert (quick.latent, quick.unet_batch, quick.repeats) == (16, 2, 2)
    assert quick.widths == full.widths and quick.sd_batch == full.sd_batch  # not sizes --quick changes


def test_given_values_win_and_none_means_unset():
    cfg = configs.unet_config(quick=True, latent=8, repeats=None, widths=[320])
    assert cfg.latent == 8 and cfg.repeats == 2 and cfg.widths == (320,)
    sweep = configs.sweep_config(quick=True, images=3, conditions=[2, 5], max_batch=None)
    assert (sweep.images, sweep.conditions, sweep.max_batch, sweep.repeats) == (3, (2, 5), None, 1)
    hash(sweep)  # frozen, with tuples: hashable


def test_sdpa_runs_first_and_is_added_when_missing():
    """Every other implementation is checked against sdpa's output, so it must run before them."""
    assert configs.unet_config(impl=["fused", "sdpa"]).impl == ("sdpa", "fused")
    assert configs.unet_config(impl=["materialising"]).impl == ("sdpa", "materialising")


def test_sweep_defaults_and_quick():
    assert configs.sweep_config() == configs.SweepConfig(images=8, conditions=None, max_batch=None, repeats=3)
    assert configs.sweep_config(quick=True) == configs.SweepConfig(images=1, conditions=(9,), repeats=1)


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        configs.unet_config().latent = 1
