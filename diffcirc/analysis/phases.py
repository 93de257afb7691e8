"""The phases of the study: ``Experiment`` runs the model on both datasets and leaves each phase's
tables in ``experiment.tables`` (``diffcirc.analysis.driver`` saves them as resumable units).

  1. trace       per-(model, dataset, timestep, layer, head) entropy / distance / label-mass
                 aggregates, histograms, per-image means and entropy histograms (a layer's heads
                 together: the unit of the divergence's permutation null), per-query maps of a few
                 sample images
                 (model = "trained" and the "random"-weights control of the same architecture)
     controls    the same per-image entropy trace of the matched-stimulus control sets
                 (``controls``: framing- and spectrum-matched synthetic faces, seen natural
                 images), trained model only
  2. features    correlations of each head's entropy map with edge / texture maps of the image
  3. ablations   every single head zero- and mean-ablated at each ablation timestep (batched, each
                 condition resumed from the clean pass at the first stage it changes)
  4. attribution one backward pass per (dataset, timestep) scores every head (first-order), and
                 ig_steps more integrate the gradient over the gates from 0 to 1
  5. roles       role assignment, then role ablations against layer-matched random head sets
  6. circuit     greedy minimal circuit per dataset under a degradation threshold, selected on
                 one split of the ablation images and evaluated on the other at every ablation
                 timestep, beside random head sets of the same size; removed heads zero- or
                 mean-ablated (``circuit_ablation``), the means always from the selection split

Under torchrun each phase shards its images, conditions or steps over the ranks
(``distributed.Ranks``) and every rank ends the phase with the full tables.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..data import load_dataset
from ..memory import free_memory_bytes, items_that_fit, pass_bytes
from ..models import ModelLoadError, random_like
from ..models.latents import LatentCache
from ..models.pipeline import load_pipeline
from ..processor import (Mean, Recorder, Session, Zero, head_attribution, integrated_head_attribution,
                         mean_head_outputs, run_conditions)
from ..processor.grid import labels_to_grid
from ..processor.stage_reuse import StageReuse, stage_units
from . import controls as control_sets
from . import image_maps
from .circuit import (EVAL_COLUMNS, TRACE_COLUMNS, greedy_minimal_circuit, kept_heads, random_head_sets,
                      resample_weights, split_images)
from .config import CONTROL_SEED_OFFSET, DATASETS, AnalysisConfig, check_timesteps, noise_for
from .distributed import Ranks
from .roles import UNASSIGNED, assign_roles, head_features, layer_matched_sets, role_set_seed


def uniform_label_shares(labels: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Same-label mass under uniform attention, per image: the share of a layer's tokens that carry
    a query's label, averaged over the queries, which is sum_c (n_c / N)^2 for N tokens of which
    n_c carry label c.

    labels: (B, S, S) integer region maps; grid: the layer's (h, w) token grid. Returns (B,) float64.
    """
    tokens = labels_to_grid(labels, grid)  # (B, h * w)
    n = tokens.shape[1]
    return torch.stack([torch.bincount(row).double().div(n).square().sum() for row in tokens])


_ROLE_CHUNK_BYTES = 1 << 28  # predictions (and their x0 and error maps) of one chunk of role conditions
ROLE_ABLATION_COLUMNS = ["dataset", "timestep", "role", "control", "rep", "image", "error_name", "err_clean",
                         "err_ablated"]


def _role_rows(dataset: str, t: int, ids: list, tags: list, order: list, errors: dict, step: int) -> pd.DataFrame:
    """Rows of the role_ablations table for one chunk of conditions at one step, built as columns.

    tags: (role, control, rep) of the chunk's conditions (len C); order: their indices among all
    role conditions; errors: {error name: (1 + C, B) tensor}, row 0 the clean pass. One row per
    (condition, error, image), in that order, with helper columns _step, _condition, _error, _b
    that order rows across chunks and ranks."""
    n_cond, n_img, names = len(tags), len(ids), list(errors)
    shape = (n_cond, len(names), n_img)
    cond, err, b = (a.reshape(-1) for a in np.indices(shape))
    ablated = np.stack([errors[e][1:].double().numpy() for e in names], axis=1)  # (C, E, B)
    clean = np.stack([errors[e][0].double().numpy() for e in names])              # (E, B)
    role, control, rep = (np.array(col, dtype=object) for col in zip(*tags)) if tags else ([], [], [])
    return pd.DataFrame({
        "dataset": dataset, "timestep": int(t), "role": np.asarray(role)[cond], "control": np.asarray(control)[cond],
        "rep": np.asarray(rep, dtype=np.int64)[cond], "image": np.asarray(ids, dtype=np.int64)[b],
        "error_name": np.array(names, dtype=object)[err], "err_clean": clean[err, b], "err_ablated": ablated.reshape(-1),
        "_step": step, "_condition": np.asarray(order, dtype=np.int64)[cond], "_error": err, "_b": b})


class _Data:
    """One dataset's images (N, 3, S, S), label maps (N, S, S) and ids, in memory; x0: what the
    denoiser noises, the images themselves or their VAE latents (N, C, S/f, S/f)."""

    def __init__(self, name, index, dataset):
        items = [dataset[i] for i in range(len(dataset))]
        if not items:
            raise ValueError(f"dataset {name!r} is empty")
        self.name, self.index = name, index
        self.images = torch.stack([it["image"] for it in items]).float()
        self.labels = torch.stack([torch.as_tensor(it["labels"]) for it in items]).long()
        self.ids = list(range(len(items)))
        self.sources = [it.get("source", "") for it in items]
        self.attributes = [it.get("attributes", {}) for it in items]
        self.x0 = self.images

    @classmethod
    def of_control(cls, name: str, control: "control_sets.ControlSet") -> "_Data":
        """A control set as a dataset: its images at rows 0..n-1 hold the given ids (a derived set
        keeps its sources' ids, so their noise)."""
        d = cls.__new__(cls)
        d.name, d.index, d.ids, d.sources, d.attributes = name, control.index, list(control.ids), control.sources, []
        d.images = torch.zeros(max(d.ids) + 1, *control.images.shape[1:])
        d.images[d.ids] = control.images.float()
        d.labels = torch.zeros(max(d.ids) + 1, *control.labels.shape[1:], dtype=torch.long)
        d.labels[d.ids] = control.labels.long()
        d.x0 = d.images
        return d

    def batches(self, batch_size, n=None, ids=None):
        """(ids, x0, labels) batches of the first n images, or of these ids."""
        if ids is None:
            ids = self.ids[: len(self.ids) if n is None else min(n, len(self.ids))]
        for i in range(0, len(ids), batch_size):
            chunk = list(ids[i:i + batch_size])
            yield chunk, self.x0[chunk], self.labels[chunk]


class Experiment:
    """The model (``load_pipeline``: the denoiser, its scheduler's noising, the VAE and the prompt's
    conditioning) and both datasets of one configuration; each phase method fills ``self.tables``
    with the tables it makes.

    Latent models see the datasets as VAE latents, encoded once into ``out/latents`` (a rerun reads
    them back); the study's loss everywhere is the model's own training loss, the MSE of its
    prediction against its scheduler's target (epsilon, v, x0, or the flow's velocity)."""

    def __init__(self, config: AnalysisConfig, ranks: Ranks | None = None, encode: bool = True):
        """encode False leaves latent models' x0 to ``encode_latents``, which every rank must then
        call (the driver does, once every rank has constructed: a collective after a rank failed
        here would wait for it forever)."""
        self.ranks = ranks or Ranks()
        self.c = config
        self.device = self.ranks.device(config.device)
        self.pipe = load_pipeline(config.model, device=self.device, dtype=getattr(torch, config.dtype),
                                  text=not config.prompt_embeds)
        self.unet, self.noising = self.pipe.model, self.pipe.noising
        self.denoiser = self.pipe.denoiser(self.pipe.read_embeds(config.prompt_embeds) if config.prompt_embeds
                                           else self.pipe.encode(config.prompt, config.max_sequence_length))
        self.size = self.pipe.check_size(config.size or self.pipe.image_size)
        self.c = config = config.with_timesteps(lambda n: self.pipe.default_timesteps(n, self.size))
        check_timesteps(config, self.noising.check)
        if self.pipe.is_latent and self.pipe.vae is None:
            raise ModelLoadError(f"{config.model!r} has no vae/ folder: the images cannot be encoded to the latents "
                                 "its denoiser takes")
        self.cache = LatentCache(Path(config.out) / "latents", self.pipe.vae, config.vae_batch_size,
                                 max_bytes=self.memory_budget) if self.pipe.is_latent else None
        specs = {"synthetic": (config.synthetic_spec, config.synthetic), "natural": (config.natural, config.natural_n)}
        self.data = {}
        for index, name in enumerate(DATASETS):
            spec, n = specs[name]
            self.data[name] = d = _Data(name, index, load_dataset(spec, size=self.size, n=n, seed=config.seed,
                                                                  split="heldout"))
        self.session = Session(self.unet)
        self.heads = self.session.heads()
        self.tables: dict = {}
        self._reference_means: dict = {}  # {(dataset, timestep): ``circuit_reference_means``}
        if encode:
            self.encode_latents()

    def encode_latents(self, datasets: dict | None = None) -> None:
        """Latent models: every dataset's x0 (``datasets``, default the study's two) becomes its VAE
        latents (N, C, S/f, S/f). Each rank encodes its share of the images (or reads them back
        from ``out/latents``), then every rank receives all of them; a rank's failure stops every
        rank. Pixel models: nothing."""
        if self.cache is None:
            return
        datasets = self.data if datasets is None else datasets
        shares, error = {}, None
        try:
            for name, d in datasets.items():
                mine = self.ranks.shard(d.ids)
                shares[name] = (mine, self.cache.latents(d.images[mine], [d.sources[i] for i in mine]) if mine else None)
        except Exception as e:  # e.g. a full disk on one machine: no rank may wait in the gather below
            error = e
        self.ranks.check(error)
        for name, d in datasets.items():
            pieces = [(ids, z) for ids, z in self.ranks.all_gather(shares[name]) if ids]
            x0 = torch.zeros(len(d.images), *pieces[0][1].shape[1:])
            for ids, z in pieces:
                x0[ids] = z
            d.x0 = x0

    def progress(self, **kwargs):
        """A progress bar on rank 0 only."""
        return tqdm(disable=not self.ranks.is_main, **kwargs)

    # -- helpers ---------------------------------------------------------------------------
    def noisy(self, d: _Data, ids, x0, t):
        """(x_t, target): x0 noised to t by the scheduler's noising with each image's own noise, and
        what the model is trained to predict there (its prediction type's target)."""
        eps = noise_for(self.c.seed, d.index, ids, t, x0.shape[1:])
        return self.noising.add_noise(x0, eps, t), self.noising.target(x0, eps, t)

    def forward(self, unet, x, t):
        """The prediction (B, C, H, W) float32 on the CPU of unet (the model or its random-weights
        control) for x at timestep t, with the run's conditioning."""
        denoiser = self.denoiser if unet is self.unet else self.denoiser.with_model(unet)
        return denoiser.predict(x, t).cpu()

    def x0_from_prediction(self, x_t, prediction, t):
        """The clean x0 the model's prediction at t implies."""
        return self.noising.x0_from_prediction(x_t, prediction, t)

    # -- 1. trace ----------------------------------------------------------------------------
    def trace(self):
        models = [("trained", self.unet)]
        if self.c.random_control:
            # a seed of its own, so that the control never equals a model initialised from `seed`
            models.append(("random", random_like(self.unet, seed=CONTROL_SEED_OFFSET + self.c.seed)))
        aggregates, histograms, per_image, image_histograms, maps = [], [], [], [], []
        samples = self.sample_ids()
        shards = {name: self.ranks.shard(d.ids) for name, d in self.data.items()}
        total = len(models) * sum(len(ids) for ids in shards.values()) * len(self.c.timesteps)
        bar = self.progress(total=total, desc="trace", unit="img")
        for model_name, unet in models:
            session = self.session if unet is self.unet else Session(unet)
            per_pass = self.trace_batch(session, unet)
            for name, d in self.data.items():
                rec = Recorder(stats=("entropy", "distance", "label_mass"), bins=self.c.bins, per_image=True,
                               maps={"images": samples[name], "stats": ["entropy"]}, image_histograms=("entropy",))
                self.trace_dataset(session, unet, model_name, d, rec, shards[name], per_pass, bar)
                aggregates.append(rec.to_frame())
                histograms.append(rec.histograms())
                per_image.append(rec.per_image_frame())
                image_histograms.append(rec.image_histogram_frame().drop(columns="stat"))
                maps.append(rec.maps_frame())
        bar.close()
        layers = self.layer_table()
        aggregates.append(self.uniform_label_mass(layers))
        self.tables.update({
            "layers": layers,
            "aggregates": pd.concat(aggregates, ignore_index=True),
            "histograms": pd.concat(histograms, ignore_index=True),
            "per_image": pd.concat(per_image, ignore_index=True),
            "image_histograms": pd.concat(image_histograms, ignore_index=True),
            "maps": pd.concat(maps, ignore_index=True).rename(columns={"value": "entropy"}).drop(columns=["stat"]),
        })

    def trace_dataset(self, session: Session, unet, model_name: str, d: _Data, rec: Recorder, ids: list,
                      per_pass: int, bar) -> None:
        """Trace these ids of d (this rank's share) at every timestep into rec, then all-reduce it."""
        for t in self.c.timesteps:
            for batch, x0, labels in d.batches(per_pass, ids=ids):
                x_t, _ = self.noisy(d, batch, x0, t)
                rec.set_tags(model=model_name, dataset=d.name, timestep=int(t), image_ids=batch)
                with torch.no_grad(), session.trace(rec, labels=labels.to(self.device)):
                    self.forward(unet, x_t, t)
                bar.update(len(batch))
        rec.all_reduce()

    # -- 1b. matched-stimulus controls -----------------------------------------------------------
    def control_data(self) -> tuple:
        """({control: _Data} of the controls this run traces (``controls.available``), the framing
        table (empty without the framing control)). Every rank builds the same sets."""
        names = control_sets.available(self.c)
        syn, nat = self.data["synthetic"], self.data["natural"]
        n = min(self.c.control_n or len(syn.ids), len(syn.ids))
        sets, framing = {}, pd.DataFrame(columns=["set", "x", "y", "width", "height", "size"])
        src = syn.ids[:n]
        for name in names:
            if name == "framing":
                images, labels, sources, framing = control_sets.framing_set(
                    syn.images[src], syn.labels[src], [syn.attributes[i] for i in src], [syn.sources[i] for i in src],
                    nat.images)
                control = control_sets.ControlSet(images, labels, src, syn.index, sources)
            elif name == "spectrum":
                images = control_sets.spectrum_set(syn.images[src], nat.images)
                control = control_sets.ControlSet(images, syn.labels[src], src, syn.index,
                                                  [f"spectrum:{syn.sources[i]}" for i in src])
            else:  # seen
                sets[name] = _Data(name, control_sets.SEEN_INDEX, control_sets.seen_dataset(self.c, self.size, n))
                continue
            sets[name] = _Data.of_control(name, control)
        return sets, framing

    def controls(self):
        sets, framing = self.control_data()
        self.encode_latents(sets)
        shards = {name: self.ranks.shard(d.ids) for name, d in sets.items()}
        bar = self.progress(total=sum(len(ids) for ids in shards.values()) * len(self.c.timesteps), desc="controls",
                            unit="img")
        per_image = []
        per_pass = self.trace_batch(self.session, self.unet) if sets else 1
        for name, d in sets.items():
            rec = Recorder(stats=("entropy",), bins=self.c.bins, per_image=True)
            self.trace_dataset(self.session, self.unet, "trained", d, rec, shards[name], per_pass, bar)
            per_image.append(rec.per_image_frame())
        bar.close()
        self.tables.update({
            "controls_per_image": pd.concat(per_image, ignore_index=True) if per_image else
            pd.DataFrame(columns=["model", "dataset", "timestep", "image", "layer", "head", "stat", "mean"]),
            "controls_framing": framing,
        })

    def trace_batch(self, session: Session, unet) -> int:
        """Images per trace pass: batch_size, fewer where one traced image's pass (measured once,
        on the first image at the first timestep, ``memory.pass_bytes``) times that many would
        exceed the memory budget."""
        d = self.data[DATASETS[0]]
        ids, x0, labels = next(d.batches(1, 1))
        x_t, _ = self.noisy(d, ids, x0, self.c.timesteps[0])
        rec = Recorder(stats=("entropy", "distance", "label_mass"), bins=self.c.bins)

        def one_image():
            with torch.no_grad(), session.trace(rec, labels=labels.to(self.device)):
                self.forward(unet, x_t, self.c.timesteps[0])

        _, cost = pass_bytes(one_image, self.device)
        return items_that_fit(cost, self.memory_budget, cap=self.c.batch_size)

    def layer_table(self) -> pd.DataFrame:
        """One row per attention layer; n_keys: the keys each query attends over (self: the image
        tokens; cross: the prompt's tokens; joint: image and text tokens), None where unknown."""
        rows = []
        conditioning = self.denoiser.conditioning
        for layer in self.session.layers:
            h, w = layer.grid if layer.grid else (None, None)
            n_keys = None
            if layer.kind == "self" and h:
                n_keys = h * w
            elif layer.kind == "cross" and conditioning is not None:
                n_keys = conditioning.n_tokens
            elif layer.kind == "joint" and h and layer.text_tokens is not None:
                n_keys = h * w + layer.text_tokens
            rows.append({"layer": layer.name, "kind": layer.kind, "heads": layer.heads, "head_dim": layer.head_dim,
                         "n_keys": n_keys, "grid_h": h, "grid_w": w})
        return pd.DataFrame(rows)

    def uniform_label_mass(self, layers: pd.DataFrame) -> pd.DataFrame:
        """Rows "label_mass_uniform" of the aggregates table: ``uniform_label_shares`` over each
        dataset's images, per self-attention layer, repeated for every model, timestep and head
        (the expectation depends on none of them)."""
        rows = []
        for name, d in self.data.items():
            for layer in layers.itertuples():
                if layer.kind not in ("self", "joint") or not layer.grid_h:
                    continue
                shares = uniform_label_shares(d.labels, (int(layer.grid_h), int(layer.grid_w)))
                for model in ("trained", "random") if self.c.random_control else ("trained",):
                    for t in self.c.timesteps:
                        for h in range(int(layer.heads)):
                            rows.append({"model": model, "dataset": name, "timestep": int(t), "layer": layer.layer,
                                         "head": h, "stat": "label_mass_uniform", "count": len(shares),
                                         "mean": float(shares.mean()), "std": float(shares.std()) if len(shares) > 1 else 0.0,
                                         "m2": float(((shares - shares.mean()) ** 2).sum())})
        return pd.DataFrame(rows)

    def sample_ids(self) -> dict:
        """{dataset: ids of the images whose per-query maps are kept}."""
        return {name: d.ids[: self.c.sample_maps] for name, d in self.data.items()}

    # -- 2. features from maps -----------------------------------------------------------------
    def map_features(self):
        maps = self.tables["maps"]
        rows = []
        for (model, name, t, layer, head), g in maps.groupby(["model", "dataset", "timestep", "layer", "head"]):
            d = self.data[name]
            corr_e, corr_t = [], []
            for image, gi in g.groupby("image"):
                gi = gi.sort_values("query")
                if (gi["row"] < 0).any():
                    continue
                grid = (int(gi["row"].max()) + 1, int(gi["col"].max()) + 1)
                ent = torch.tensor(gi["entropy"].to_numpy(), dtype=torch.float64)[None]
                img = d.images[int(image)][None].double()
                corr_e.append(float(image_maps.pearson_rows(ent, image_maps.to_grid(image_maps.edge_magnitude(img), grid))))
                corr_t.append(float(image_maps.pearson_rows(ent, image_maps.to_grid(image_maps.texture_energy(img), grid))))
            if corr_e:
                rows.append({"model": model, "dataset": name, "timestep": int(t), "layer": layer, "head": int(head),
                             "edge_corr": float(np.mean(corr_e)), "texture_corr": float(np.mean(corr_t)),
                             "n_images": len(corr_e)})  # the role rules flag correlations from few images
        self.tables["features_maps"] = pd.DataFrame(rows)

    # -- 3. single-head ablations ------------------------------------------------------------
    def ablation_steps(self) -> list:
        """[(dataset, timestep)] of the ablation phases, in their order."""
        return [(name, t) for name in DATASETS for t in self.c.resolved_ablation_timesteps()]

    def ablation_batch(self, name: str, t: int):
        """(ids, x0, labels, x_t, target) of the first ablation_images images of dataset name, noised
        to t (target: what the model is trained to predict, see ``noisy``)."""
        d = self.data[name]
        ids, x0, labels = next(d.batches(self.c.ablation_images, self.c.ablation_images))
        x_t, target = self.noisy(d, ids, x0, t)
        return ids, x0, labels, x_t, target

    def run_share(self, conditions, x_t, t):
        """This rank's share of a batched step: (indices into conditions, eps predictions
        (len(indices), B, 3, S, S)). Index 0, the clean pass, is run by every rank as its baseline;
        passes are bounded by max_batch and the memory budget, and resume from the clean pass at
        the first stage their conditions change (``run_conditions``' reuse)."""
        mine = [0, *self.ranks.shard(range(1, len(conditions)))]
        with torch.no_grad():
            eps_hat = run_conditions(self.session, lambda x: self.forward(self.unet, x, t), x_t,
                                     [conditions[c] for c in mine], max_batch=max(self.c.max_batch, x_t.shape[0]),
                                     max_bytes=self.memory_budget)
        return mine, eps_hat

    @property
    def memory_budget(self) -> int:
        if self.c.max_memory is not None:
            return int(self.c.max_memory)
        if str(self.device).startswith("cuda"):
            return free_memory_bytes(self.device) // 2
        return free_memory_bytes(self.device) // (2 * self.ranks.per_host)  # the processes of a host share it

    def gathered(self, keyed_rows: list) -> list:
        """Rows of every rank, in the order of their keys (the order one process would have made)."""
        return [row for _, row in sorted(self.ranks.gather_rows(keyed_rows), key=lambda kr: kr[0])]

    def ablations(self):
        rows = []
        for step, (name, t) in enumerate(self.progress(iterable=self.ablation_steps(), desc="ablations", unit="step")):
            ids, _, _, x_t, eps = self.ablation_batch(name, t)
            conditions, labels = [[]], [None]
            if "zero" in self.c.ablation_modes:
                conditions += [[Zero(layer, h)] for layer, h in self.heads]
                labels += [("zero", layer, h) for layer, h in self.heads]
            if "mean" in self.c.ablation_modes:
                means = mean_head_outputs(self.session, lambda x: self.forward(self.unet, x, t), [x_t])
                conditions += [[Mean(layer, h, means=means)] for layer, h in self.heads]
                labels += [("mean", layer, h) for layer, h in self.heads]
            mine, eps_hat = self.run_share(conditions, x_t, t)
            loss = (eps_hat - eps[None]).square().flatten(2).mean(-1)  # (len(mine), B)
            for i, c in enumerate(mine[1:], start=1):
                mode, layer, h = labels[c]
                for b, image in enumerate(ids):
                    rows.append(((step, c, b), {
                        "dataset": name, "timestep": int(t), "layer": layer, "head": h, "mode": mode, "image": int(image),
                        "loss_clean": float(loss[0, b]), "loss_ablated": float(loss[i, b])}))
        self.tables["ablations"] = pd.DataFrame(self.gathered(rows))

    # -- 4. attribution ----------------------------------------------------------------------
    def attribution(self):
        frames = []
        for step, (name, t) in self.ranks.shard(enumerate(self.ablation_steps())):
            _, _, _, x_t, eps = self.ablation_batch(name, t)
            def loss():
                return (self.forward(self.unet, x_t, t) - eps).square().mean()

            scores = head_attribution(self.session, loss)
            if self.c.ig_steps:
                scores["score_ig"] = integrated_head_attribution(self.session, loss, self.c.ig_steps)["score"]
            scores.insert(0, "timestep", int(t))
            scores.insert(0, "dataset", name)
            frames.append((step, scores))
        self.tables["attribution"] = pd.concat(self.gathered(frames), ignore_index=True)

    # -- 5. roles and role ablations ------------------------------------------------------------
    def role_conditions(self) -> tuple:
        """(conditions, tags) of the role ablations: per assigned role, the zero ablation of its heads
        (tag (role, "role", 0)), then its ``layer_matched_sets`` (tags (role, "random", rep)), at most
        role_control_reps of them, drawn once from ``role_set_seed(seed, role)``: the same sets at
        every step, whatever the ablation timesteps, on every rank."""
        features = head_features(self.tables["aggregates"], self.tables["layers"], self.tables.get("features_maps"),
                                 model="trained")
        roles = assign_roles(features)
        conditions, tags = [], []
        for role, g in roles.groupby("role", sort=True):
            if role == UNASSIGNED:
                continue
            heads = [(r.layer, int(r.head)) for r in g.itertuples()]
            conditions.append([Zero(layer, h) for layer, h in heads])
            tags.append((role, "role", 0))
            sets = layer_matched_sets(self.heads, heads, self.c.role_control_reps, role_set_seed(self.c.seed, role))
            conditions += [[Zero(layer, h) for layer, h in s] for s in sets]
            tags += [(role, "random", rep) for rep in range(len(sets))]
        return conditions, tags

    def role_ablations(self):
        conditions, tags = self.role_conditions()
        frames = []
        for step, (name, t) in enumerate(self.progress(iterable=self.ablation_steps(), desc="role ablations",
                                                       unit="step")):
            ids, x0, labels, x_t, eps = self.ablation_batch(name, t)
            # chunks of conditions bound the predictions held at once (thousands of random sets)
            chunk = max(1, _ROLE_CHUNK_BYTES // (3 * x_t.numel() * 4))
            for start in range(0, len(conditions), chunk):
                mine, eps_hat = self.run_share([[], *conditions[start:start + chunk]], x_t, t)
                errors = self.condition_errors(x_t, eps_hat, eps, x0, labels, t)
                frames.append(((step, start), _role_rows(name, t, ids, [tags[start + c - 1] for c in mine[1:]],
                                                         [start + c for c in mine[1:]], errors, step)))
        order = ["_step", "_condition", "_error", "_b"]
        gathered = [f for _, f in self.ranks.gather_rows(frames)]
        if not gathered:  # no role assigned: nothing ablated
            self.tables["role_ablations"] = pd.DataFrame(columns=ROLE_ABLATION_COLUMNS)
            return
        # the order one process makes: step, condition, error, image (ranks interleave conditions)
        table = pd.concat(gathered, ignore_index=True).sort_values(order, kind="stable", ignore_index=True)
        self.tables["role_ablations"] = table.drop(columns=order)

    def condition_errors(self, x_t, prediction, target, x0, labels, t) -> dict:
        """{error name: (n, B)}: ``errors`` of n conditions' predictions (n, B, C, H, W) of one batch
        at t (x_t, target, x0 (B, C, H, W), labels (B, S, S)), scored in one batched call."""
        n, b = prediction.shape[:2]
        x0_hat = self.x0_from_prediction(x_t[None], prediction, t)
        rep = lambda z: z.repeat(n, *([1] * (z.dim() - 1)))  # noqa: E731  every condition's copy of the batch
        return {e: v.reshape(n, b) for e, v in self.errors(
            prediction.flatten(0, 1), rep(target), x0_hat.flatten(0, 1), rep(x0), rep(labels),
            latent=self.pipe.is_latent).items()}

    @staticmethod
    def errors(prediction, target, x0_hat, x0, labels, latent: bool = False) -> dict:
        """Per-image (B,) errors of one condition: "eps_mse", the training loss (the MSE against the
        model's own target, epsilon or not), and ``image_maps.role_errors`` of the predicted x0.

        Pixel models: x0 (B, 3, S, S) images, x0_hat clamped to their range [-1, 1]. Latent models
        (latent=True): x0 (B, C, h, w) latents, compared without decoding (a VAE decode per
        condition would cost more than the denoiser), each latent channel as a grey image (the
        latents are aligned with the image, f pixels per latent) with the labels taken at the
        latent grid, and the errors averaged over channels."""
        out = {"eps_mse": (prediction - target).square().flatten(1).mean(1)}
        if not latent:
            out.update(image_maps.role_errors(x0_hat.clamp(-1, 1), x0, labels))
            return out
        b, c, h, w = x0.shape
        grey = lambda z: z.reshape(b * c, 1, h, w).expand(-1, 3, -1, -1)  # noqa: E731  luminance of grey = itself
        at_grid = labels_to_grid(labels, (h, w)).reshape(b, h, w).repeat_interleave(c, dim=0)
        out.update({name: e.reshape(b, c).mean(1) for name, e in
                    image_maps.role_errors(grey(x0_hat), grey(x0), at_grid).items()})
        return out

    # -- 6. minimal circuit ----------------------------------------------------------------------
    def circuit(self):
        """Select each dataset's circuit on its selection split at the circuit timestep (greedy, and
        again on each bootstrap resample of the split), then evaluate it on both splits at every
        ablation timestep against random head sets on the held-out split. Tables circuit,
        circuit_resamples and circuit_eval (schemas in ``circuit``).

        Removed heads are ablated as ``circuit_ablation`` says: zeroed, or (mean) replaced by their
        mean output per position over the dataset's selection split at the same timestep
        (``circuit_reference_means``). The search runs on that split, so its means are in sample
        (the held-out images are the only other reference, and reading them would leak the
        evaluation images into the selection); the held-out evaluation of the circuit and of its
        random sets uses the same selection means, a reference set disjoint from the images
        evaluated."""
        t = self.c.resolved_circuit_timestep()
        splits = self.circuit_splits()
        units = [(index, name, r) for index, name in enumerate(DATASETS) for r in range(-1, self.c.circuit_resamples)]
        searches, traces, resampled = {}, [], []
        for key, (index, name, r) in self.ranks.shard(enumerate(units)):
            selection = splits[name][0]
            if name not in searches:
                searches[name] = _SelectionLosses(self, self.data[name], selection, t,
                                                  self.circuit_reference_means(name, t, selection))
            weights = np.ones(len(selection), dtype=np.int64) if r < 0 else \
                resample_weights(len(selection), self.c.circuit_resamples, self.c.seed, index)[r]
            search = searches[name]
            _, trace = greedy_minimal_circuit(self.heads, lambda removed, w=weights: search.degradation(removed, w),
                                              self.c.circuit_threshold, order=self.circuit_order(name, t, selection, weights))
            trace.insert(0, "timestep", int(t))
            trace.insert(0, "dataset", name)
            if r < 0:
                traces.append((key, trace))
            else:
                trace.insert(0, "resample", r)
                resampled.append((key, trace))
        circuit = pd.concat(self.gathered(traces), ignore_index=True)
        resampled = self.gathered(resampled)
        self.tables.update({
            "circuit": circuit,
            "circuit_resamples": pd.concat(resampled, ignore_index=True) if resampled else
            pd.DataFrame(columns=["resample", "dataset", "timestep", *TRACE_COLUMNS]),
            "circuit_eval": self.circuit_evaluation(circuit, splits),
        })

    def circuit_splits(self) -> dict:
        """{dataset: (selection ids, held-out ids)}: ``split_images`` of its ablation images."""
        return {name: split_images(d.ids[: self.c.ablation_images], self.c.circuit_heldout_fraction, self.c.seed,
                                   d.index) for name, d in self.data.items()}

    def circuit_order(self, name: str, t: int, ids: list, weights: np.ndarray):
        """The greedy candidate order: heads by their single zero-ablation loss on these selection
        images (count-weighted), least first, from the ablations table; None (the search measures
        single effects itself) when the table lacks any of those (head, image) rows, and under
        mean circuit ablation (the table's mean rows use the whole ablation batch's means, held-out
        images among them: the search measures single effects with the selection split's)."""
        abl = self.tables.get("ablations")
        if abl is None or abl.empty or self.c.circuit_ablation != "zero":
            return None
        single = abl[(abl.dataset == name) & (abl.timestep == t) & (abl["mode"] == "zero") & abl.image.isin(ids)]
        table = single.pivot_table(index=["layer", "head"], columns="image", values="loss_ablated", aggfunc="mean")
        table = table.reindex(index=pd.MultiIndex.from_tuples(self.heads), columns=list(ids))
        if table.isna().to_numpy().any():
            return None
        effect = dict(zip(self.heads, table.to_numpy(np.float64) @ weights))
        return sorted(self.heads, key=effect.get)

    def circuit_reference_means(self, name: str, t: int, selection: list):
        """None under zero ablation; under mean ablation {layer: (H, Nq, Dv)}, every head's output
        averaged over dataset name's selection images (``selection``, its ``circuit_splits`` share)
        noised to t with their own seeded noise (``noisy``), computed once per (dataset, t)."""
        if self.c.circuit_ablation == "zero":
            return None
        if (name, t) not in self._reference_means:
            d = self.data[name]
            x_t, _ = self.noisy(d, selection, d.x0[selection], t)
            self._reference_means[name, t] = mean_head_outputs(self.session, lambda x: self.forward(self.unet, x, t),
                                                               [x_t])
        return self._reference_means[name, t]

    @staticmethod
    def circuit_removal(heads, means) -> list:
        """The interventions that remove these (layer, head)s: ``Zero`` each, or ``Mean`` each with
        these reference means (``circuit_reference_means``; None: zero ablation)."""
        if means is None:
            return [Zero(layer, int(h)) for layer, h in heads]
        return [Mean(layer, int(h), means=means) for layer, h in heads]

    def circuit_removed_sets(self, circuit: pd.DataFrame) -> tuple:
        """({dataset: the (layer, head)s outside its circuit, sorted}, {dataset: its random sets of
        as many heads, ``random_head_sets`` index lists into ``self.heads``, drawn from (seed,
        dataset index)}) of a ``circuit`` trace table; no random set when the circuit removes no
        head or every head (no set of that size differs from the circuit's own)."""
        removed, randoms = {}, {}
        for index, name in enumerate(DATASETS):
            removed[name] = sorted(set(self.heads) - kept_heads(circuit[circuit.dataset == name]))
            n = len(removed[name])
            randoms[name] = random_head_sets(len(self.heads), n, self.c.circuit_random_sets, self.c.seed, index) \
                if 0 < n < len(self.heads) else []
        return removed, randoms

    def circuit_eval_conditions(self, name: str, split: int, t: int, removed: list, randoms: list,
                                splits: dict) -> tuple:
        """(conditions, tags) of one ``circuit_eval`` step of dataset name at t: the clean pass (tag
        None), the circuit's removed heads (("circuit", 0)) and, on the held-out split (split 1),
        each random set (("random", rep)), removed as ``circuit_removal`` says with the selection
        split's means (``splits``: ``circuit_splits``). removed, randoms: the dataset's
        ``circuit_removed_sets``."""
        means = self.circuit_reference_means(name, t, splits[name][0])
        conditions = [[], self.circuit_removal(removed, means)]
        tags = [None, ("circuit", 0)]
        if split == 1:
            conditions += [self.circuit_removal([self.heads[i] for i in pick], means) for pick in randoms]
            tags += [("random", rep) for rep in range(len(randoms))]
        return conditions, tags

    def circuit_evaluation(self, circuit: pd.DataFrame, splits: dict) -> pd.DataFrame:
        """``circuit_eval`` rows: each dataset's circuit (its removed heads ablated as
        ``circuit_ablation`` says, mean ablation with the selection split's means at that timestep)
        on its selection and held-out images at every ablation timestep, and on the held-out
        images the random sets of as many heads, drawn once per dataset (``random_head_sets``) and
        ablated with the same means."""
        steps = [(index, name, split, t) for index, name in enumerate(DATASETS) for split in (0, 1)
                 for t in self.c.resolved_ablation_timesteps()]
        removed, randoms = self.circuit_removed_sets(circuit)
        rows = []
        for step, (index, name, split, t) in enumerate(self.progress(iterable=steps, desc="circuit eval", unit="step")):
            conditions, tags = self.circuit_eval_conditions(name, split, t, removed[name], randoms[name], splits)
            d, ids = self.data[name], splits[name][split]
            x_t, eps = self.noisy(d, ids, d.x0[ids], t)
            mine, eps_hat = self.run_share(conditions, x_t, t)
            loss = (eps_hat - eps[None]).square().flatten(2).mean(-1)  # (len(mine), B)
            for i, c in enumerate(mine[1:], start=1):
                condition, rep = tags[c]
                for b, image in enumerate(ids):
                    rows.append(((step, c, b), {
                        "dataset": name, "split": ("selection", "heldout")[split], "timestep": int(t),
                        "condition": condition, "mode": self.c.circuit_ablation, "rep": rep,
                        "n_removed": len(removed[name]), "image": int(image),
                        "loss_clean": float(loss[0, b]), "loss_ablated": float(loss[i, b])}))
        return pd.DataFrame(self.gathered(rows), columns=EVAL_COLUMNS)


class _SelectionLosses:
    """Per-image losses (B,) of a dataset's selection split at the selection timestep with any set
    of heads ablated: zeroed, or with ``means`` (``Experiment.circuit_reference_means``: the
    split's own, in sample) mean-ablated. Each set is run once (the resamples' searches share the
    sets their paths have in common; a resample weighs the split's images but keeps the split's
    means) and resumes from the clean pass at the first stage its removed heads change."""

    def __init__(self, exp: Experiment, d: _Data, ids: list, t: int, means=None):
        self.exp, self.t, self.means = exp, t, means
        self.x_t, self.eps = exp.noisy(d, ids, d.x0[ids], t)
        self.reuse = StageReuse(exp.session) if stage_units(exp.unet) else None
        with torch.no_grad(), exp.session.intervene([]), self.reuse.recording() if self.reuse else nullcontext():
            self.clean = self._loss()
        self.cache: dict = {}

    def _loss(self) -> np.ndarray:
        prediction = self.exp.forward(self.exp.unet, self.x_t, self.t)
        return (prediction - self.eps).square().flatten(1).mean(1).double().numpy()

    def losses(self, removed: frozenset) -> np.ndarray:
        if removed not in self.cache:
            with torch.no_grad(), self.exp.session.intervene(self.exp.circuit_removal(sorted(removed), self.means)), \
                    self.reuse.resuming() if self.reuse else nullcontext():
                self.cache[removed] = self._loss()
        return self.cache[removed]

    def degradation(self, removed: frozenset, weights: np.ndarray) -> float:
        """Percent degradation of the count-weighted mean loss (weights (B,): 1 each for the split
        itself, bootstrap counts for a resample)."""
        clean = float(weights @ self.clean)
        return 100.0 * (float(weights @ self.losses(removed)) - clean) / clean


__all__ = ["Experiment", "uniform_label_shares"]
