"""``diffcirc report DIR``: rebuilds the summary with the run's own bootstrap size and seed."""

import json

from diffcirc.cli import main as cli


def test_report_uses_the_runs_bootstrap_and_seed(tmp_path, capsys):
    (tmp_path / "meta.json").write_text(json.dumps({"config": {"bootstrap": 123, "seed": 7}}))
    assert cli(["report", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["settings"]["n_resamples"] == 123 and summary["settings"]["seed"] == 7
    assert (tmp_path / "report.html").is_file()
    assert f"report: {tmp_path / 'report.html'}" in capsys.readouterr().out


def test_folder_without_meta_is_refused_in_one_line(tmp_path, capsys):
    assert cli(["report", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == f"diffcirc report: error: {tmp_path} is not a diffcirc analysis folder (no meta.json)\n"
    assert not (tmp_path / "summary.json").exists()
