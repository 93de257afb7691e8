"""The driver: runs the phases of ``phases.Experiment`` as resumable work units and writes the
study's tables and ``meta.json`` into ``config.out``. It stops there: ``summary.summarise`` and
``diffcirc.report.render`` read the folder afterwards (``diffcirc analyze`` does both).

    config = AnalysisConfig(model="bundled", synthetic=64, natural="lfw", out="runs/demo")
    out = run_analysis(config)    # out/*.parquet, meta.json, manifest.json, samples/*.png

Each phase is a unit of ``units.WorkUnits``: a rerun on the same folder skips the finished ones.
One run holds the folder at a time (``folder_lock``). Under torchrun every rank runs every phase
on its share and ends it with the full tables; rank 0 alone holds the lock, reads and writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import platform
import time
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pandas as pd
import torch

from .. import __version__
from ..files import write_image, write_json, write_table
from .config import AnalysisConfig
from .controls import available as available_controls
from .distributed import Ranks
from .folder_lock import hold_folder
from .phases import Experiment
from .units import WorkUnits


class Phase(NamedTuple):
    unit: str                            # its name in manifest.json
    run: Callable[[Experiment], None]    # the Experiment method that makes its tables
    tables: tuple                        # the tables it makes
    inputs: tuple                        # the units whose tables it reads


PHASES = (
    Phase("trace", Experiment.trace, ("layers", "aggregates", "histograms", "per_image", "image_histograms", "maps"),
          ()),
    Phase("controls", Experiment.controls, ("controls_per_image", "controls_framing"), ()),
    Phase("features", Experiment.map_features, ("features_maps",), ("trace",)),
    Phase("ablations", Experiment.ablations, ("ablations",), ()),
    Phase("attribution", Experiment.attribution, ("attribution",), ()),
    Phase("role_ablations", Experiment.role_ablations, ("role_ablations",), ("trace", "features")),
    Phase("circuit", Experiment.circuit, ("circuit", "circuit_resamples", "circuit_eval"), ("ablations",)),
)


def run_analysis(config: AnalysisConfig, ranks: Ranks | None = None) -> Path | None:
    """Runs every phase not finished by an earlier run of the same configuration on config.out and
    writes their tables, the sample images and meta.json there.

    Returns the folder. Under torchrun (``ranks``: default ``Ranks.from_env``) every process calls
    it; rank 0 writes and returns the folder, the others return None. While another run holds the
    folder it raises ``folder_lock.FolderBusyError``, or waits when ``config.wait``.
    """
    ranks = ranks or Ranks.from_env(config.device)
    try:
        with contextlib.ExitStack() as held:
            ranks.on_main(lambda: held.enter_context(hold_folder(config.out, wait=config.wait)))
            return _run(config, ranks)
    finally:
        ranks.close()


def _run(config: AnalysisConfig, ranks: Ranks) -> Path | None:
    start = time.time()
    torch.manual_seed(config.seed)
    out = Path(config.out)
    # a folder of another configuration stops every rank with rank 0's error, before any work
    # (the Experiment encodes latents into the folder)
    units = ranks.on_main(lambda: WorkUnits(out, {"config": config.settings(), **input_digests(config),
                                                  "diffcirc": __version__}))
    exp, error = None, None
    try:
        exp = Experiment(config, ranks, encode=False)
    except Exception as e:  # e.g. a model or dataset one machine cannot read: every rank stops
        error = e
    ranks.check(error)
    exp.encode_latents()  # each rank its share of the images, then all of them on every rank
    for phase in PHASES:
        if ranks.broadcast(ranks.on_main(lambda: units.done(phase.unit))):
            if ranks.is_main:
                print(f"{phase.unit}: finished by an earlier run, skipped")
            # rank 0 reads; every rank receives them, so ranks need not share a file system
            tables = ranks.on_main(lambda: {name: pd.read_parquet(out / f"{name}.parquet") for name in phase.tables})
            exp.tables.update(ranks.broadcast(tables))
            continue
        phase.run(exp)

        def save():
            for name in phase.tables:
                write_table(exp.tables[name], out / f"{name}.parquet")
            units.finish(phase.unit, [f"{name}.parquet" for name in phase.tables], phase.inputs)

        ranks.on_main(save)  # a full disk on rank 0 stops every rank
    if not ranks.is_main:
        return None
    save_samples(exp, out / "samples")
    write_json(meta(config, exp, ranks.world, wall_time_s=time.time() - start), out / "meta.json")
    return out


def input_digests(config: AnalysisConfig) -> dict:
    """Digests of the input files whose contents the results depend on beyond their path: the
    --prompt-embeds file (new embeddings under the same name are a new prompt, not a resumed run)."""
    if not config.prompt_embeds:
        return {}
    try:
        digest = hashlib.sha256(Path(config.prompt_embeds).read_bytes()).hexdigest()
    except OSError as e:
        raise FileNotFoundError(f"--prompt-embeds {config.prompt_embeds}: {e.strerror or e}") from None
    return {"prompt_embeds_sha256": digest}


def save_samples(exp: Experiment, folder: Path) -> None:
    """The images whose per-query maps are kept, as PNGs for the report: folder/<dataset>_<id>.png."""
    from PIL import Image

    for name, ids in exp.sample_ids().items():
        for i in ids:
            img = ((exp.data[name].images[i].permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
            write_image(Image.fromarray(img), folder / f"{name}_{i}.png")


def meta(config: AnalysisConfig, exp: Experiment, processes: int, wall_time_s: float) -> dict:
    """meta.json: how the folder was made (configuration as given, data, model size, the timesteps it
    resolved to, versions, wall time)."""
    resolved = exp.c
    return {
        "config": {"out": config.out, **config.settings()},
        "model": config.model,
        "family": exp.pipe.family,
        "image_size": exp.size,
        "noise": [{"timestep": int(t), **exp.noising.describe(t)} for t in resolved.timesteps],
        "data": {name: {"spec": config.synthetic_spec if name == "synthetic" else config.natural,
                        "n": len(d.ids), "image_size": exp.size} for name, d in exp.data.items()},
        "controls": list(available_controls(config)),
        "layers": len(exp.session.layers),
        "heads": len(exp.heads),
        "timesteps": list(resolved.timesteps),
        "ablation_timesteps": resolved.resolved_ablation_timesteps(),
        "circuit_timestep": resolved.resolved_circuit_timestep(),
        "seed": config.seed,
        "processes": processes,
        "versions": {"diffcirc": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "wall_time_s": round(wall_time_s, 1),
    }


__all__ = ["PHASES", "Phase", "input_digests", "meta", "run_analysis", "save_samples"]
