"""Helpers of the phases against hand-computed values."""

import dataclasses
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from diffcirc.analysis.config import AnalysisConfig
from diffcirc.analysis.distributed import Ranks
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


def test_x0_from_prediction_inverts_the_noising_with_hand_computed_coefficients():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffcirc.models.noising import DDPMNoising, FlowMatching

    x0 = torch.tensor([[0.5, -1.0], [0.25, 0.0]])
    eps = torch.tensor([[1.0, 2.0], [-0.5, 1.5]])
    # alpha_bar = 0.36 at t = 1: x_t = 0.6 x0 + 0.8 eps, so x0 = (x_t - 0.8 eps) / 0.6
    epsilon = SimpleNamespace(noising=DDPMNoising(torch.tensor([0.9, 0.36])))
    x_t = 0.6 * x0 + 0.8 * eps
    got = Experiment.x0_from_prediction(epsilon, x_t, eps, 1)
    assert got.flatten().tolist() == pytest.approx(x0.flatten().tolist(), abs=1e-6)
    # a wrong eps_hat moves x0_hat by -(0.8 / 0.6) times the error
    moved = Experiment.x0_from_prediction(epsilon, x_t, eps + 0.3, 1)
    assert (moved - x0).flatten().tolist() == pytest.approx([-0.4] * 4, abs=1e-6)
    # v = 0.6 eps - 0.8 x0, and x0 = 0.6 x_t - 0.8 v
    v = SimpleNamespace(noising=DDPMNoising(torch.tensor([0.9, 0.36]), "v_prediction"))
    got = Experiment.x0_from_prediction(v, x_t, 0.6 * eps - 0.8 * x0, 1)
    assert got.flatten().tolist() == pytest.approx(x0.flatten().tolist(), abs=1e-6)
    # flow matching at t = 250 of 1000: x_t = 0.75 x0 + 0.25 eps, velocity eps - x0, x0 = x_t - 0.25 velocity
    flow = SimpleNamespace(noising=FlowMatching(FlowMatchEulerDiscreteScheduler()))
    got = Experiment.x0_from_prediction(flow, 0.75 * x0 + 0.25 * eps, eps - x0, 250)
    assert got.flatten().tolist() == pytest.approx(x0.flatten().tolist(), abs=1e-6)


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


def test_errors_of_latents_are_per_channel_unclamped_with_labels_at_the_latent_grid():
    # latents (1, 2, 4, 4) of an 8x8 image labelled left half 0, right half 1: at the latent grid the
    # labels split columns 0-1 from 2-3. Channel 0 of x0_hat is 2 on the left, 0 on the right (not
    # clamped to 1); region averages keep that step, so its part error is 4 on half the latents = 2,
    # channel 1 is exact (0): the mean over channels is 1 (labels lost at the grid would give 0.5)
    x0 = torch.zeros(1, 2, 4, 4)
    x0_hat = torch.zeros(1, 2, 4, 4)
    x0_hat[0, 0, :, :2] = 2.0
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, :, 4:] = 1
    err = Experiment.errors(torch.ones(1, 2, 4, 4), torch.zeros(1, 2, 4, 4), x0_hat, x0, labels, latent=True)
    assert set(err) == {"eps_mse", "edge", "high_freq", "part"}
    assert err["part"].tolist() == pytest.approx([1.0], abs=1e-6)
    assert err["eps_mse"].tolist() == pytest.approx([1.0], abs=1e-12)
    # a constant offset of one channel has no edges and no high frequencies
    flat = Experiment.errors(x0, x0, torch.full((1, 2, 4, 4), 3.0), x0, labels, latent=True)
    assert flat["edge"].tolist() == pytest.approx([0.0], abs=1e-6)
    assert flat["high_freq"].tolist() == pytest.approx([0.0], abs=1e-6)
    assert flat["part"].tolist() == pytest.approx([9.0], abs=1e-5)


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


def test_max_memory_bounds_the_trace_batches_without_changing_the_tables(tiny_experiment):
    exp = tiny_experiment
    given = exp.c

    def trace(max_memory):
        exp.c = dataclasses.replace(given, max_memory=max_memory)
        passes = []
        handle = exp.unet.register_forward_pre_hook(lambda module, args: passes.append(args[0].shape[0]))
        try:
            exp.trace()
        finally:
            handle.remove()
            exp.c = given
        return {name: exp.tables[name] for name in ("aggregates", "histograms", "per_image", "image_histograms",
                                                    "maps")}, passes

    tight, tight_passes = trace(1)  # below one image's pass: one image per pass
    loose, loose_passes = trace(1 << 40)
    # the measuring pass of one image, then each dataset's 2 images at the one timestep
    assert tight_passes == [1, 1, 1, 1, 1] and loose_passes == [1, 2, 2]
    for name in tight:  # rows in pass order: compared by their keys
        ordered = [t.sort_values(list(t.columns)).reset_index(drop=True) for t in (tight[name], loose[name])]
        pd.testing.assert_frame_equal(*ordered, rtol=1e-5, obj=name)


class _ThreadRanks(Ranks):
    """Ranks of processes simulated by threads of this one: all_gather meets at a barrier."""

    def __init__(self, rank, world, board):
        super().__init__(rank, world)
        self.board = board

    def all_gather(self, obj):
        self.board["barrier"].wait()
        self.board[self.rank] = obj
        self.board["barrier"].wait()
        out = [self.board[r] for r in range(self.world)]
        self.board["barrier"].wait()
        return out


def test_each_rank_encodes_its_share_of_the_latents_and_receives_all(tmp_path, single_thread):
    import threading

    from helpers import tiny_pipelines as tp

    tp.sd_pipeline(tmp_path / "sd")
    config = AnalysisConfig(model=str(tmp_path / "sd"), synthetic=3, natural_n=2, timesteps=[600],
                            size=tp.IMAGE_SIZE, out=str(tmp_path / "out"))
    alone = Experiment(dataclasses.replace(config, out=str(tmp_path / "alone")))
    board, ranks = {"barrier": threading.Barrier(2)}, {}
    for r in range(2):
        ranks[r] = Experiment(config, _ThreadRanks(r, 2, board), encode=False)
    threads = [threading.Thread(target=ranks[r].encode_latents) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    # images[rank::2] of each dataset: 2 + 1 synthetic, 1 + 1 natural
    assert [ranks[r].cache.encoded for r in range(2)] == [3, 2] and alone.cache.encoded == 5
    for r in range(2):
        for name, d in alone.data.items():
            torch.testing.assert_close(ranks[r].data[name].x0, d.x0, rtol=1e-5, atol=1e-6)


def test_a_derived_control_is_traced_with_its_sources_noise(tiny_experiment, monkeypatch):
    """A spectrum 'control' that leaves the images as they are must trace exactly as its synthetic
    sources do: the same images, ids and noise, through the same trace."""
    import diffcirc.analysis.controls as control_sets

    exp = tiny_experiment
    monkeypatch.setattr(control_sets, "spectrum_set", lambda images, natural: images.clone())
    exp.trace()
    exp.controls()
    keys = ["timestep", "image", "layer", "head", "stat"]
    synthetic = exp.tables["per_image"].query("model == 'trained' and dataset == 'synthetic' and stat == 'entropy'")
    control = exp.tables["controls_per_image"].query("dataset == 'spectrum'")
    assert set(exp.tables["controls_per_image"]["dataset"]) == {"framing", "spectrum", "seen"}
    assert len(control) == len(synthetic) > 0
    pd.testing.assert_series_equal(*(t.sort_values(keys)["mean"].reset_index(drop=True) for t in (synthetic, control)),
                                   rtol=1e-6)
    framing = exp.tables["controls_per_image"].query("dataset == 'framing'").sort_values(keys)["mean"].to_numpy()
    assert not (abs(framing - synthetic.sort_values(keys)["mean"].to_numpy()) < 1e-6).all()  # a real crop differs


def test_control_sets_hold_as_many_images_as_the_synthetic_set_unless_told(tiny_experiment):
    exp = tiny_experiment
    given, natural_ids = exp.c, exp.data["natural"].ids
    try:
        exp.data["natural"].ids = natural_ids[:1]  # a smaller natural set does not shrink the controls
        sets, framing = exp.control_data()
        assert {name: (len(d.ids), d.index) for name, d in sets.items()} == {"framing": (2, 0), "spectrum": (2, 0),
                                                                             "seen": (2, 2)}
        assert set(framing["set"]) >= {"natural", "synthetic"}
        exp.c = dataclasses.replace(given, control_n=1, controls=("seen",))
        sets, framing = exp.control_data()
        assert list(sets) == ["seen"] and len(sets["seen"].ids) == 1 and framing.empty
    finally:
        exp.c, exp.data["natural"].ids = given, natural_ids


# -- the circuit under mean ablation -----------------------------------------------------------------

@pytest.fixture(scope="module")
def circuit_experiment(tmp_path_factory, single_thread):
    """An Experiment on the tiny random UNet whose circuit phase selects on 2 of 4 images per
    dataset and evaluates at two timesteps (the means must be each timestep's own), with 2 random
    sets and no resamples; beside it the model loaded again, for the direct computations."""
    from diffcirc.models import load

    model_dir = save_analysis_unet(tmp_path_factory.mktemp("circuit-unet"))
    config = AnalysisConfig(model=str(model_dir), synthetic=4, natural_n=4, timesteps=[300, 600],
                            ablation_timesteps=[300, 600], circuit_timestep=600, ablation_images=4,
                            circuit_random_sets=2, circuit_resamples=0, random_control=False)
    unet, scheduler = load(str(model_dir))
    return SimpleNamespace(exp=Experiment(config), unet=unet, scheduler=scheduler)


def _direct(ctx, name: str, ids: list, t: int):
    """(x_t, eps) of dataset name's images ids noised to t with the study's per-image noise, from
    the scheduler's alphas and ``noise_for`` (not the Experiment's noising)."""
    from diffcirc.analysis.config import DATASETS, noise_for

    x0 = ctx.exp.data[name].images[ids]
    eps = noise_for(0, DATASETS.index(name), ids, t, x0.shape[1:])
    a = ctx.scheduler.alphas_cumprod[t].float()
    return a.sqrt() * x0 + (1 - a).sqrt() * eps, eps


def _direct_losses(ctx, session, x_t, eps, t, interventions) -> torch.Tensor:
    """(B,) ε-MSE float64 of the reloaded model with these interventions installed."""
    tt = torch.full((x_t.shape[0],), t, dtype=torch.long)
    with torch.no_grad(), session.intervene(interventions):
        eps_hat = ctx.unet(x_t, tt).sample
    return (eps_hat - eps).square().flatten(1).mean(1).double()


def _direct_means(ctx, session, x_t, t) -> dict:
    from diffcirc.processor import mean_head_outputs

    tt = torch.full((x_t.shape[0],), t, dtype=torch.long)
    return mean_head_outputs(session, lambda x: ctx.unet(x, tt).sample, [x_t])


def _planted_circuit(heads) -> pd.DataFrame:
    """A ``circuit`` trace per dataset keeping every other head (3 of 6 removed, so that random
    sets of 3 other heads exist), whatever a search on a random model would keep."""
    rows = [{"dataset": name, "timestep": 600, "step": k, "removed_layer": layer, "removed_head": h,
             "kept": k % 2 == 0, "degradation": 0.0} for name in ("synthetic", "natural")
            for k, (layer, h) in enumerate(heads)]
    return pd.DataFrame(rows)


def test_mean_ablated_circuit_is_evaluated_with_the_selection_splits_means(circuit_experiment):
    """Under --circuit-ablation mean the search removes heads with the selection images' own means
    (in sample), and the held-out rows hold the loss of the removed heads (and of each random set)
    replaced by their mean output over the *selection* images at the same timestep, recomputed
    here; the held-out images' own means give losses this check tells apart."""
    from diffcirc.analysis.circuit import random_head_sets, split_images, summarise_circuits
    from diffcirc.processor import Mean, Session

    ctx = circuit_experiment
    exp, given = ctx.exp, ctx.exp.c
    session = Session(ctx.unet)
    heads = session.heads()
    planted = _planted_circuit(heads)
    exp.c = dataclasses.replace(given, circuit_ablation="mean")
    try:
        exp.circuit()
        trace = exp.tables["circuit"]
        ev = exp.circuit_evaluation(planted, exp.circuit_splits())
    finally:
        exp.c = given
    assert set(ev["mode"]) == {"mean"} and set(ev.timestep) == {300, 600}
    assert set(exp.tables["circuit_eval"]["mode"]) == {"mean"}
    assert summarise_circuits(planted, ev, n_resamples=0)["ablation"] == "mean"
    removed = [h for k, h in enumerate(heads) if k % 2 == 1]
    checked, rtol = {"circuit": 0, "random": 0}, 1e-6  # the rows agree exactly here; batching may round
    for index, name in enumerate(("synthetic", "natural")):
        selection, heldout = split_images(range(4), 0.5, seed=0, dataset=index)
        # the search, in sample: its first step removes one head with the selection images' means
        x_sel, eps_sel = _direct(ctx, name, selection, 600)
        first = trace[trace.dataset == name].sort_values("step").iloc[0]
        clean = _direct_losses(ctx, session, x_sel, eps_sel, 600, []).mean()
        one = _direct_losses(ctx, session, x_sel, eps_sel, 600, [Mean(first.removed_layer, int(first.removed_head),
                                                                      means=_direct_means(ctx, session, x_sel, 600))])
        assert first.degradation == pytest.approx(float(100 * (one.mean() - clean) / clean), abs=1e-6)
        sets = [[heads[i] for i in s] for s in random_head_sets(len(heads), len(removed), 2, seed=0, dataset=index)]
        for t in (300, 600):
            x_sel, _ = _direct(ctx, name, selection, t)
            x_held, eps_held = _direct(ctx, name, heldout, t)
            reference = _direct_means(ctx, session, x_sel, t)
            own = _direct_means(ctx, session, x_held, t)  # what an in-sample evaluation would use
            assert max(float((reference[k] - own[k]).abs().max()) for k in reference) > 1e-3
            rows = ev[(ev.dataset == name) & (ev.split == "heldout") & (ev.timestep == t)]
            for condition, rep, chosen in [("circuit", 0, removed), *[("random", k, s) for k, s in enumerate(sets)]]:
                got = rows[(rows.condition == condition) & (rows.rep == rep)].sort_values("image")
                assert got["image"].tolist() == heldout, (name, t, condition, rep)
                got = torch.tensor(got["loss_ablated"].to_numpy())
                want = _direct_losses(ctx, session, x_held, eps_held, t,
                                      [Mean(layer, h, means=reference) for layer, h in chosen])
                torch.testing.assert_close(got, want, rtol=rtol, atol=0, msg=f"{name} t={t} {condition} {rep}")
                leak = _direct_losses(ctx, session, x_held, eps_held, t,
                                      [Mean(layer, h, means=own) for layer, h in chosen])
                assert float(((leak - want).abs() / want).max()) > 50 * rtol, (name, t, condition, rep)
                checked[condition] += 1
    assert checked == {"circuit": 4, "random": 8}


def test_circuit_zero_ablation_stays_the_default_and_zeroes_the_removed_heads(circuit_experiment):
    from diffcirc.analysis.circuit import split_images, summarise_circuits
    from diffcirc.processor import Session, Zero

    ctx = circuit_experiment
    assert AnalysisConfig().circuit_ablation == "zero" and ctx.exp.c.circuit_ablation == "zero"
    session = Session(ctx.unet)
    heads = session.heads()
    planted = _planted_circuit(heads)
    ev = ctx.exp.circuit_evaluation(planted, ctx.exp.circuit_splits())
    assert set(ev["mode"]) == {"zero"} and summarise_circuits(planted, ev, n_resamples=0)["ablation"] == "zero"
    _, heldout = split_images(range(4), 0.5, seed=0, dataset=1)
    x_held, eps_held = _direct(ctx, "natural", heldout, 300)
    got = ev.query("dataset == 'natural' and split == 'heldout' and timestep == 300 and condition == 'circuit'")
    want = _direct_losses(ctx, session, x_held, eps_held, 300, [Zero(layer, h) for k, (layer, h) in enumerate(heads)
                                                                if k % 2 == 1])
    torch.testing.assert_close(torch.tensor(got.sort_values("image")["loss_ablated"].to_numpy()), want, rtol=1e-6,
                               atol=0)
