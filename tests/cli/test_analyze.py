"""``diffcirc analyze``: options read their defaults from AnalysisConfig and set its fields; the
command composes run_analysis, summarise, render and print_summary."""

import json

import pytest

from diffcirc.analysis.config import AnalysisConfig
from diffcirc.cli import build_parser
from diffcirc.cli import main as cli
from diffcirc.cli.analyze import config_from_args


def config_of(*argv) -> AnalysisConfig:
    return config_from_args(build_parser().parse_args(["analyze", *argv]))


def test_no_options_give_the_configs_defaults(tmp_path):
    assert config_of("--out", str(tmp_path)) == AnalysisConfig(out=str(tmp_path))


def test_options_set_their_fields(tmp_path):
    config = config_of("--out", str(tmp_path), "--synthetic", "5", "--natural", "photos", "--natural-n", "3",
                       "--timesteps", "100,600", "--ablation-timesteps", "600", "--ablation-images", "2",
                       "--ablation-modes", "zero", "--circuit-threshold", "2.5", "--role-control-reps", "1",
                       "--no-random-control", "--batch-size", "4", "--max-batch", "8", "--max-memory", "1KiB",
                       "--seed", "7", "--wait")
    assert config == AnalysisConfig(
        out=str(tmp_path), synthetic=5, natural="photos", natural_n=3, timesteps=[100, 600], ablation_timesteps=[600],
        ablation_images=2, ablation_modes=("zero",), circuit_threshold=2.5, role_control_reps=1, random_control=False,
        batch_size=4, max_batch=8, max_memory=1024, seed=7, wait=True)


def test_circuit_ablation_option_sets_its_field_and_refuses_other_modes(tmp_path, capsys):
    assert config_of("--out", str(tmp_path)).circuit_ablation == "zero"
    assert config_of("--out", str(tmp_path), "--circuit-ablation", "mean").circuit_ablation == "mean"
    with pytest.raises(SystemExit) as exit_:
        config_of("--out", str(tmp_path), "--circuit-ablation", "resample")
    assert exit_.value.code == 2 and "--circuit-ablation" in capsys.readouterr().err
    # a folder made under one mode is not resumed under the other
    assert config_of("--out", str(tmp_path), "--circuit-ablation", "mean").settings() != \
        config_of("--out", str(tmp_path)).settings()


@pytest.mark.parametrize("argv, controls", [([], ("framing", "spectrum", "seen")), (["--controls", "none"], ()),
                                            (["--controls", "seen", "framing", "seen"], ("seen", "framing"))])
def test_controls_option_names_the_control_sets(tmp_path, argv, controls):
    assert config_of("--out", str(tmp_path), *argv).controls == controls
    assert config_of("--out", str(tmp_path), "--control-n", "5").control_n == 5


@pytest.mark.parametrize("argv", [["--controls", "blur"], ["--controls", "none", "seen"], ["--controls"]])
def test_unknown_controls_are_refused(tmp_path, capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        config_of("--out", str(tmp_path), *argv)
    assert exit_.value.code == 2 and "--controls" in capsys.readouterr().err


def test_pipeline_options_set_their_fields(tmp_path):
    config = config_of("--out", str(tmp_path), "--prompt", "a photo of a face", "--max-sequence-length", "77",
                       "--size", "512", "--vae-batch-size", "2", "--dtype", "bfloat16")
    assert config == AnalysisConfig(out=str(tmp_path), prompt="a photo of a face", max_sequence_length=77, size=512,
                                    vae_batch_size=2, dtype="bfloat16")
    assert config_of("--out", str(tmp_path), "--prompt-embeds", "e.safetensors").prompt_embeds == "e.safetensors"
    # the VAE's batches change no result (latents are cached per image): a folder resumes whatever they were
    assert config.settings() == AnalysisConfig(**{**vars(config), "vae_batch_size": 8}).settings()
    assert config.settings() != AnalysisConfig(**{**vars(config), "prompt": ""}).settings()


def test_prompt_and_prompt_embeds_exclude_each_other(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        config_of("--out", str(tmp_path), "--prompt", "a face", "--prompt-embeds", "e.safetensors")
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("natural, given, spec", [("lfw", None, "synthetic-gray"), ("celeba", None, "synthetic"),
                                                  ("celeba", "synthetic-gray", "synthetic-gray"),
                                                  ("lfw", "synthetic", "synthetic")])
def test_synthetic_spec_follows_the_natural_dataset_unless_given(tmp_path, natural, given, spec):
    natural = f"celeba:{tmp_path}" if natural == "celeba" else natural
    argv = ["--out", str(tmp_path / "out"), "--natural", natural, *(["--synthetic-spec", given] if given else [])]
    assert config_of(*argv).synthetic_spec == spec


def test_analyze_summarises_and_reports_the_folder_it_ran(tmp_path, monkeypatch, capsys):
    import diffcirc.analysis.driver as driver

    out = tmp_path / "out"
    configs = []

    def analysis(config):  # a run that made no tables: the summary is all nulls, the report still renders
        configs.append(config)
        out.mkdir()
        (out / "meta.json").write_text(json.dumps({"config": {"seed": config.seed}}))
        return out

    monkeypatch.setattr(driver, "run_analysis", analysis)
    assert cli(["analyze", "--out", str(out), "--seed", "3"]) == 0
    assert configs[0].seed == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["seed"] == 3 and summary["settings"]["n_resamples"] == AnalysisConfig().bootstrap
    assert (out / "report.html").is_file() and (out / "report.md").is_file()
    assert f"report: {out / 'report.html'}" in capsys.readouterr().out


def test_ranks_other_than_the_first_report_nothing(tmp_path, monkeypatch, capsys):
    import diffcirc.analysis.driver as driver

    monkeypatch.setattr(driver, "run_analysis", lambda config: None)  # what ranks 1.. of torchrun get
    assert cli(["analyze", "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out == "" and not (tmp_path / "out").exists()
