"""Fixtures of the report tests: a summary written by hand, whose numbers are recognisable and none
of them the paper's, and a folder with the few tables the report draws its figures from."""

import copy
import json

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imsave

LAYER = "mid_block.attentions.0"
DATASETS = ("synthetic", "natural")
TIMESTEPS = (100, 900)


def _top_row(dataset, timestep, head, percent, lo, hi, p, p_holm, p_bh, clean, family_size):
    return {"dataset": dataset, "layer": LAYER, "head": head, "timestep": timestep, "mode": "zero", "percent": percent,
            "ci_low": lo, "ci_high": hi, "loss_clean": clean, "delta_loss": clean * percent / 100, "p_value": p,
            "p_holm": p_holm, "p_bh": p_bh, "family_size": family_size}


def _role(role, n_heads, n_matching, mean, sd, normalised, status=None, random_matching=None, map_images=None):
    return {"role": role, "n_heads": n_heads, "n_matching": n_matching, "entropy_mean": mean, "entropy_sd": sd,
            "normalised_mean": normalised, "status": status, "random_matching": random_matching,
            "random_heads": 24 if status else None, "map_images": map_images}


SUMMARY = {
    "tables": ["aggregates", "layers", "maps", "ablations", "attribution"],
    "complexity_ratio": {"value": 1.237, "ci_low": 1.112, "ci_high": 1.359, "p_value": 0.0123, "cohens_d": 0.77,
                         "n_synthetic": 7, "n_natural": 9, "confidence": 0.95, "source": "per_image"},
    "entropy_divergence": {"per_timestep": {"100": 0.0421, "900": 0.2468}, "mean_diff": {"100": 0.0135, "900": -0.0246},
                           "min": 0.0421, "max": 0.2468},
    "entropy": {"entropy_mean": 2.718, "normalised_mean": 0.693,
                "by_dataset": {"natural": {"entropy_mean": 2.9, "normalised_mean": 0.7},
                               "synthetic": {"entropy_mean": 2.5, "normalised_mean": 0.68}}},
    "roles": [{"layer": LAYER, "head": 0, "role": "texture_analysis", "roles": ["texture_analysis", "timestep_gated"],
               "entropy_mean": 3.371, "entropy_sd": 0.052, "normalised": 0.812, "distance_rel": 1.087},
              {"layer": LAYER, "head": 1, "role": "unassigned", "roles": [], "entropy_mean": 1.234,
               "entropy_sd": 0.075, "normalised": 0.445}],
    "role_summary": [_role("texture_analysis", 3, 4, 3.333, 0.044, 0.8, "uninformative", 22, 40),
                     _role("edge_detection", 1, 2, 2.222, None, 0.6, "under-powered", 1, 8),
                     _role("unassigned", 2, 2, 1.111, 0.5, 0.4)],
    "role_validation": [{"dataset": "natural", "role": "texture_analysis", "error_name": "high_freq", "n_timesteps": 2,
                         "n_units": 6, "n_sets": 3, "role_degradation": 34.51, "random_median": 7.93,
                         "random_q95": 9.87, "difference": 26.58, "ci_low": 12.34, "ci_high": 40.12,
                         "direction": "role > random", "p_rank": 0.25, "p_floor": 0.25, "p_holm": 0.5},
                        {"dataset": "natural", "role": "edge_detection", "error_name": "edge", "n_timesteps": 2,
                         "n_units": 6, "n_sets": 99, "role_degradation": 3.21, "random_median": 2.5,
                         "random_q95": 6.5, "difference": 0.71, "ci_low": -1.5, "ci_high": 2.25,
                         "direction": "role > random", "p_rank": 0.37, "p_floor": 0.01, "p_holm": 0.5}],
    "degradation": {"mode": "zero", "min": 12.3, "max": 87.7,
                    "top": [_top_row("natural", 900, 1, 87.7, 70.1, 99.4, 0.0031, 0.0062, 0.0047, 0.02, 4),
                            _top_row("synthetic", 100, 0, 12.3, 5.2, 19.8, 0.2, 0.4, 0.3, 0.4, 4)],
                    "by_mode": {"zero": {"min": 12.3, "max": 87.7}}, "n_tests": 8, "n_significant_holm": 3,
                    "n_significant_bh": 5},
    "circuit": {"synthetic_size": 3, "natural_size": 7, "ratio": 2.333, "n_heads": {"natural": 8, "synthetic": 8},
                "final_degradation": {"natural": 4.4, "synthetic": 9.9}},
    "attribution_spearman": {"rho": 0.877, "p_value": 0.0042, "n": 16,
                             "magnitude": {"rho": 0.612, "p_value": 0.0118, "n": 16},
                             "per_group": [{"dataset": "natural", "timestep": 900, "rho": 0.654, "p_value": 0.0321,
                                            "n": 8, "rho_magnitude": 0.521, "p_magnitude": 0.1850}]},
    "random_control": {
        "complexity_ratio": {"value": 1.012, "ci_low": 0.988, "ci_high": 1.035, "p_value": 0.61, "source": "per_image"},
        "entropy": {"entropy_mean": 4.051, "normalised_mean": 0.972},
        "entropy_divergence": {"per_timestep": {"100": 0.0031, "900": 0.0059},
                               "mean_diff": {"100": 0.001, "900": 0.002}, "min": 0.0031, "max": 0.0059},
        "roles": [_role("texture_analysis", 5, 6, 4.111, 0.033, 0.99)],
    },
    "meta": {"model": "tiny-ddpm", "seed": 0, "wall_time_s": 12.5,
             "data": {"synthetic": {"spec": "synthetic-gray", "n": 6}, "natural": {"spec": "lfw", "n": 6}}},
    "settings": {"n_resamples": 199, "seed": 3, "top": 10},
}


@pytest.fixture
def hand_summary():
    """A deep copy of SUMMARY, free to change."""
    return copy.deepcopy(SUMMARY)


def write_figure_tables(out):
    """The tables the report's figures read (aggregates, layers, maps, ablations, attribution) and
    sample images: one layer of 2 heads on a 4 x 4 grid, two datasets, two timesteps."""
    rng = np.random.default_rng(0)
    pd.DataFrame({"layer": [LAYER], "kind": ["self"], "heads": [2], "head_dim": [8], "n_keys": [16], "grid_h": [4],
                  "grid_w": [4]}).to_parquet(out / "layers.parquet")
    agg = [(m, ds, t, LAYER, h, "entropy", 96, 1.0 + 0.5 * h + (0.2 if ds == "natural" else 0.0), 0.1, 0.96)
           for m in ("trained", "random") for ds in DATASETS for t in TIMESTEPS for h in range(2)]
    pd.DataFrame(agg, columns=["model", "dataset", "timestep", "layer", "head", "stat", "count", "mean", "std", "m2"]
                 ).to_parquet(out / "aggregates.parquet")
    maps = [("trained", ds, 900, 0, LAYER, h, q, q / 16) for ds in DATASETS for h in range(2) for q in range(16)]
    pd.DataFrame(maps, columns=["model", "dataset", "timestep", "image", "layer", "head", "query", "entropy"]
                 ).to_parquet(out / "maps.parquet")
    abl, att = [], []
    for ds in DATASETS:
        for t in TIMESTEPS:
            for h in range(2):
                clean = rng.uniform(0.05, 0.1, 4)
                abl += [(ds, t, LAYER, h, "zero", i, clean[i], clean[i] * (1.2 + 0.3 * h)) for i in range(4)]
                att.append((ds, t, LAYER, h, -0.1 * (1 + h)))
    pd.DataFrame(abl, columns=["dataset", "timestep", "layer", "head", "mode", "image", "loss_clean", "loss_ablated"]
                 ).to_parquet(out / "ablations.parquet")
    pd.DataFrame(att, columns=["dataset", "timestep", "layer", "head", "score"]).to_parquet(out / "attribution.parquet")
    (out / "samples").mkdir()
    for ds in DATASETS:
        imsave(out / "samples" / f"{ds}_0.png", rng.uniform(0, 1, (16, 16, 3)))


def _report_folder(out):
    write_figure_tables(out)
    (out / "summary.json").write_text(json.dumps(SUMMARY))
    return out


@pytest.fixture
def report_dir(tmp_path):
    """A folder with the figure tables and ``summary.json`` = SUMMARY, free to change."""
    return _report_folder(tmp_path)


@pytest.fixture(scope="module")
def report_tables(tmp_path_factory):
    """The same folder, shared by a module's tests that only render into it."""
    return _report_folder(tmp_path_factory.mktemp("report"))


def _control_row(value, lo, hi, d, d_lo, d_hi, synthetic, share, share_lo, share_hi, n=5, n_synthetic=5, p=0.0312):
    return {"value": value, "ci_low": lo, "ci_high": hi, "p_value": p, "p_floor": 1 / 2001, "n_permutations": 2000,
            "cohens_d": d, "cohens_d_ci_low": d_lo, "cohens_d_ci_high": d_hi,
            "synthetic_ratio": {"value": synthetic, "ci_low": synthetic - 0.011, "ci_high": synthetic + 0.012},
            "share": {"value": share, "ci_low": share_lo, "ci_high": share_hi}, "n_control": n,
            "n_synthetic": n_synthetic}


CONTROLS = {  # two controls of recognisable numbers: framing (matched) and seen (exposure)
    "by_control": {
        "framing": {"kind": "matched", "pooled": _control_row(0.981, 0.975, 0.987, -1.23, -1.9, -0.61, 0.952,
                                                              0.604, 0.41, 0.77, p=1 / 2001),
                    "by_timestep": [{"timestep": 100, **_control_row(0.962, 0.95, 0.97, -2.1, -2.8, -1.4, 0.921,
                                                                     0.517, 0.33, 0.69)},
                                    {"timestep": 900, **_control_row(0.999, 0.99, 1.01, 0.05, -0.6, 0.7, 0.998,
                                                                     None, None, None)}]},
        "seen": {"kind": "exposure", "pooled": _control_row(1.004, 0.99, 1.02, 0.11, -0.5, 0.74, 0.95, -0.083, -0.31,
                                                            0.16, n_synthetic=7),
                 "by_timestep": []}},
    "framing": [{"set": "natural", "x": 0.4321, "y": 0.5432, "width": 0.2719, "height": 0.3991, "size": 0.3294}],
}



@pytest.fixture
def hand_controls():
    """A copy of CONTROLS, the summary's "controls" key written by hand."""
    return copy.deepcopy(CONTROLS)
