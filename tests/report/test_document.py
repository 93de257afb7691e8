"""render(): the report says what the summary and tables say, cell by cell, and nothing else."""

import json
import re

import pandas as pd
import pytest

from diffcirc.report import render

DASH = "\u2014"
PAPER_ROW = "Complexity ratio H(natural) / H(synthetic)"


def md_rows(md: str) -> list:
    """The cells of every Markdown table row (header rows included, separators not)."""
    return [[c.strip() for c in line.strip()[2:-2].split(" | ")] for line in md.splitlines()
            if line.startswith("| ")]


def md_tables(md: str) -> dict:
    """{first cell: the row's cells} of every table row, for first cells that are unique."""
    return {row[0]: row for row in md_rows(md)}


def md_section(md: str, title: str) -> str:
    """The Markdown of one ``## title`` section."""
    return md.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


@pytest.fixture(scope="module")
def rendered(report_tables):
    """render() of SUMMARY over the figure tables, once for the tests that only read it."""
    return render(report_tables, json.loads((report_tables / "summary.json").read_text()))


def test_report_is_self_contained_and_has_key_numbers(report_tables, rendered):
    text = rendered["html"].read_text()
    assert not re.search(r"<img[^>]+src=['\"](?!data:image/png;base64,)", text)
    assert "<script" not in text and "http://" not in text and "https://" not in text
    assert text.count("data:image/png;base64,") == len(rendered["figures"]) >= 6
    # the paper's numbers, always labelled as the paper's, and ours beside them
    for number in ("1.084", "0.015", "0.166", "4.16", "25.6", "128.3", "4.159",
                   "1.237 [1.112, 1.359]", "12.3% \u2013 87.7%", "0.042 \u2013 0.247"):
        assert number in text, number
    assert "Mechanistic Interpretability of Diffusion Models" in text and "natural: lfw (n=6)" in text
    md = rendered["md"].read_text()
    for png in rendered["figures"]:
        assert png.parent == report_tables / "figures" and png.stat().st_size > 0 and f"figures/{png.name}" in md


def test_paper_table_puts_each_number_in_its_cell(rendered):
    rows = md_tables(rendered["md"].read_text())
    assert rows[PAPER_ROW][1:] == ["1.084", "1.237 [1.112, 1.359]; p = 0.0123", "1.012 [0.988, 1.035]"]
    assert rows["Entropy divergence across timesteps (JS, nats)"][1:] == [
        "0.015 \u2013 0.166", "0.042 \u2013 0.247", "0.003 \u2013 0.006"]
    assert rows["Texture-analysis heads: entropy (nats)"][1:] == [
        "4.16 \u00b1 0.08", "3.333 \u00b1 0.044 (n=3)", "4.111 \u00b1 0.033 (n=5)"]
    assert rows["Single-head ablation degradation"][1:] == ["25.6% \u2013 128.3%", "12.3% \u2013 87.7%", DASH]
    assert rows["Mean head entropy (nats) / normalised"][2:] == ["2.718 / 0.693", "4.051 / 0.972"]
    assert rows["Minimal circuit size natural / synthetic"][2] == "7 / 3 = 2.333"
    assert rows["Attribution vs ablation (Spearman \u03c1)"][2] == "0.877; p = 0.0042; n = 16"


def test_section_tables_follow_the_summary(rendered):
    md = rendered["md"].read_text()
    divergence = md_tables(md_section(md, "Entropy divergence across timesteps"))
    assert divergence["100"][1:] == ["0.0421", "0.0135", "0.0031"]
    assert divergence["900"][1:] == ["0.2468", "-0.0246", "0.0059"]
    ablations = md_section(md, "Head ablations")
    assert md_rows(ablations)[1:] == [
        ["natural", "900", "mid_block.attentions.0", "1", "zero", "87.7", "[70.1, 99.4]", "0.0200", "0.0175", "0.0031",
         "0.0062", "0.0047", "4"],
        ["synthetic", "100", "mid_block.attentions.0", "0", "zero", "12.3", "[5.2, 19.8]", "0.4000", "0.0492", "0.2000",
         "0.4000", "0.3000", "4"]]
    assert "after Holm: 3 of 8, after Benjamini\u2013Hochberg: 5" in ablations
    roles = md_section(md, "Functional head roles")
    by_role = md_tables(roles)
    assert by_role["texture analysis"][1:] == ["3 (4)", "3.333 \u00b1 0.044 (n=3)", "0.800", "5 (6)",
                                               "4.111 \u00b1 0.033 (n=5)",
                                               "uninformative (22 of 24 random-weights heads)", "4.16 \u00b1 0.08"]
    assert by_role["edge detection"][1:3] == ["1 (2)", "2.222 (n=1)"] and by_role["edge detection"][-1] == DASH
    assert by_role["edge detection"][-2] == "under-powered (1 of 24 random-weights heads); maps from 8 images"
    assert by_role["unassigned"][-2] == DASH
    validation = [r for r in md_rows(roles) if r[0] == "natural"]
    # p at its floor 1 / (3 + 1) is printed as a bound, not as an equality
    assert validation == [
        ["natural", "texture analysis", "high_freq", "3", "34.5", "7.9 (9.9)", "26.6 [12.3, 40.1]", "role > random",
         "\u2264 0.2500 (floor)", "0.5000"],
        ["natural", "edge detection", "edge", "99", "3.2", "2.5 (6.5)", "0.7 [-1.5, 2.2]", "role > random", "0.3700",
         "0.5000"]]
    assert "0.25 for n = 3, 0.01 for n = 99" in roles
    assert [r for r in md_rows(roles) if r[0] == "mid_block.attentions.0"] == [
        ["mid_block.attentions.0", "0", "texture analysis", "texture analysis, timestep-gated", "3.371", "0.052",
         "0.812", "1.087"],
        ["mid_block.attentions.0", "1", "unassigned", DASH, "1.234", "0.075", "0.445", DASH]]
    circuit = md_section(md, "Minimal circuits")
    assert md_rows(circuit)[1:] == [["synthetic", "3", "8", "9.9"], ["natural", "7", "8", "4.4"]]
    assert "Size ratio natural / synthetic: 2.333." in circuit
    attribution = md_section(md, "Attribution patching vs ablation")
    assert "pooled: 0.877 (p = 0.0042, n = 16); between their magnitudes: 0.612 (p = 0.0118)" in attribution
    assert md_rows(attribution)[1:] == [["natural", "900", "0.654", "0.0321", "0.521", "0.1850", "8"]]


def test_changed_summary_changes_the_numbers(tmp_path, hand_summary):
    hand_summary["complexity_ratio"].update(value=0.913, ci_low=0.871, ci_high=0.95, p_value=0.00004)
    hand_summary["degradation"].update(min=3.1, max=44.4)
    hand_summary["random_control"] = None
    md = render(tmp_path, hand_summary)["md"].read_text()
    rows = md_tables(md)
    assert rows[PAPER_ROW][1:] == ["1.084", "0.913 [0.871, 0.950]; p < 0.0001", DASH]
    assert rows["Single-head ablation degradation"][2] == "3.1% \u2013 44.4%"
    assert "1.237" not in md and "87.7%" not in md and "1.012" not in md


def test_divergence_table_shows_each_timesteps_permutation_null(tmp_path, hand_summary):
    hand_summary["entropy_divergence"]["null"] = {
        "per_timestep": {"100": {"js": 0.0421, "null_mean": 0.0392, "null_q95": 0.0455, "p_value": 0.3117},
                         "900": {"js": 0.2468, "null_mean": 0.0107, "null_q95": 0.0151, "p_value": 1 / 2001}},
        "n_permutations": 2000, "p_floor": 1 / 2001, "n_beyond_null_q95": 1, "n_significant": 1, "n_timesteps": 2}
    md = render(tmp_path, hand_summary)["md"].read_text()
    section = md_section(md, "Entropy divergence across timesteps")
    rows = md_tables(section)
    assert rows["timestep"][1:] == ["JS (trained)", "null mean", "p", "H(nat) \u2212 H(syn) (trained)",
                                    "JS (random control)", "null mean", "p"]
    # the random control has no null in this summary: dashes in its columns
    assert rows["100"][1:] == ["0.0421", "0.0392", "0.3117", "0.0135", "0.0031", DASH, DASH]
    assert rows["900"][1:] == ["0.2468", "0.0107", "\u2264 0.0005", "-0.0246", "0.0059", DASH, DASH]
    assert "tested against 2000 permutations" in section and "95th percentile at 1 of 2 timesteps" in section


def _write_per_image(out, natural_scale: float):
    """Per-image entropy only: synthetic images 1, 2, 3 and natural 3, 4, 5 times natural_scale."""
    rows = [("trained", ds, 10, i, "a", 0, "entropy", v)
            for ds, values in (("synthetic", [1.0, 2.0, 3.0]), ("natural", [3.0 * natural_scale, 4.0 * natural_scale,
                                                                            5.0 * natural_scale]))
            for i, v in enumerate(values)]
    pd.DataFrame(rows, columns=["model", "dataset", "timestep", "image", "layer", "head", "stat", "mean"]).to_parquet(
        out / "per_image.parquet")


# Ratio = 4 scale / 2. Exact permutation p over the C(6, 3) = 20 label splits: at scale 1 the two 3s
# make two splits per tail as extreme as the observed one (p = 2 * 2 / 20), at 1.25 only one
# (2 * 1 / 20), the smallest p 20 splits can give: printed as that floor, not as an equality.
@pytest.mark.parametrize("scale, ratio, p", [(1.0, "2.000", "p = 0.2000"),
                                             (1.25, "2.500", "p \u2264 0.1, the floor of 20 permutations")])
def test_rendered_ratio_follows_the_data(tmp_path, scale, ratio, p):
    _write_per_image(tmp_path, scale)  # no summary.json: render summarises the tables first
    rows = md_tables(render(tmp_path, n_resamples=199)["md"].read_text())
    value, rest = rows[PAPER_ROW][2].split(" [", 1)
    assert value == ratio and rest.endswith(f"]; {p}")
    assert json.loads((tmp_path / "summary.json").read_text())["complexity_ratio"]["value"] == pytest.approx(
        float(ratio))


def test_render_without_optional_tables(report_dir, hand_summary):
    for name in ("maps", "ablations", "attribution"):
        (report_dir / f"{name}.parquet").unlink()
    for key in ("degradation", "circuit", "attribution_spearman", "role_validation"):
        hand_summary[key] = None
    paths = render(report_dir, hand_summary)
    text = paths["html"].read_text()
    assert paths["html"].is_file() and {p.stem for p in paths["figures"]} == {
        "entropy_heatmaps", "complexity_ratio", "divergence"}
    assert "Head ablations" not in text and "Minimal circuits" not in text and "Head entropy across timesteps" in text


def test_empty_folder_renders_the_paper_beside_dashes(tmp_path):
    paths = render(tmp_path)
    assert "1.084" in paths["html"].read_text()
    rows = md_tables(paths["md"].read_text())
    assert rows[PAPER_ROW][1:] == ["1.084", f"{DASH}; p = {DASH}", DASH]
    assert paths["figures"] == [] and (tmp_path / "summary.json").is_file()


def test_controls_section_shows_each_control_beside_the_ratio(tmp_path, hand_summary, hand_controls):
    hand_summary["controls"] = hand_controls
    md = render(tmp_path, hand_summary)["md"].read_text()
    section = md_section(md, "Matched-stimulus controls of the complexity ratio")
    rows = md_tables(section)
    assert rows["framing"][1:] == ["5 / 5", "0.981 [0.975, 0.987]", "-1.23 [-1.90, -0.61]",
                                   "p \u2264 0.0005, the floor of 2000 permutations", "0.952 [0.941, 0.964]",
                                   "explained 0.60 [0.41, 0.77]"]
    assert rows["seen"][1:] == ["5 / 7", "1.004 [0.990, 1.020]", "0.11 [-0.50, 0.74]", "p = 0.0312",
                                "0.950 [0.939, 0.962]", "relative -0.08 [-0.31, 0.16]"]
    per_step = [r for r in md_rows(section) if r[0] in ("100", "900")]
    assert per_step == [["100", "0.921 [0.910, 0.933]", "framing", "0.962 [0.950, 0.970]", "-2.10 [-2.80, -1.40]",
                         "explained 0.52 [0.33, 0.69]"],
                        ["900", "0.998 [0.987, 1.010]", "framing", "0.999 [0.990, 1.010]", "0.05 [-0.60, 0.70]",
                         DASH]]
    assert rows["natural (estimated from its mean image)"][1:] == ["0.432", "0.543", "0.272", "0.399", "0.329"]
    hand_summary["controls"] = None
    assert "Matched-stimulus controls" not in render(tmp_path, hand_summary)["md"].read_text()


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_circuit_section_says_how_the_removed_heads_were_ablated(tmp_path, hand_summary, mode):
    row = {"dataset": "natural", "timestep": 900, "selected": True, "n_removed": 1, "n_selection": 3,
           "n_heldout": 3, "selection_percent": 4.4, "heldout_percent": 6.1, "ci_low": 2.0, "ci_high": 9.0,
           "random_n": 0, "random_median": None, "random_q05": None, "random_q95": None, "rank": None,
           "p_value": None}
    hand_summary["circuit"].update(ablation=mode, evaluation=[row])
    circuit = md_section(render(tmp_path, hand_summary)["md"].read_text(), "Minimal circuits")
    if mode == "zero":
        assert "removed heads zero-ablated" in circuit and "heads outside each circuit zero-ablated" in circuit
        assert "mean-ablated" not in circuit
    else:
        assert "zero-ablated" not in circuit
        assert "removed heads mean-ablated" in circuit and "(in sample: the search runs on those images)" in circuit
        assert "heads outside each circuit mean-ablated" in circuit
        assert "a held-out reference for the held-out images and the random sets" in circuit
