"""The circuit study on top of the processor layer, as a library that stops at its tables and
meta.json; summaries and reports are made from the saved folder.

    from diffcirc.analysis import AnalysisConfig, run_analysis, summarise

    out = run_analysis(AnalysisConfig(model="bundled", out="runs/demo"))  # tables, meta.json
    summary = summarise(out)                                              # summary.json

config       AnalysisConfig (every default of the study, once), default timesteps, noise per image
phases       Experiment: trace, controls, features, ablations, attribution, role ablations, circuit -> tables
driver       run_analysis: the phases as resumable work units, then meta.json
units        the manifest of finished work units of a folder
folder_lock  one run per output folder (an exclusive lock naming its holder's pid)
distributed  the processes of a torchrun launch and the collectives the phases need
controls     the matched-stimulus control sets (framing, spectrum, seen) built from the study's images
image_maps   edge / texture maps of images and role-relevant errors of predicted x0
metrics      entropy profiles, complexity ratio, entropy divergence, degradation, attribution agreement
roles        head features, the eight role rules and their random-weights checks, layer-matched
             random head sets, role validation (one-sided rank p, hierarchical bootstrap)
circuit      greedy minimal circuit, its held-out split, random-set baseline and overlaps
recompute    one row of a finished run rerun alone from its configuration and seeds
significance the significance tests (scipy), usable on saved tables
summary      summary.json from saved tables
"""

# Loaded on first use, so that reading saved tables (metrics, summary: what the report imports)
# does not import the model stack the driver needs.
_LAZY = {"AnalysisConfig": "config", "noise_for": "config",
         "run_analysis": "driver", "summarise": "summary"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_LAZY)
