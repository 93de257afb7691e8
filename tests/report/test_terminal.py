"""print_summary(): the terminal table holds the summary's numbers in their rows."""

import io

from diffcirc.report import print_summary


def _printed(summary) -> str:
    buf = io.StringIO()
    print_summary(summary, file=buf)
    return buf.getvalue()


def _row(out: str, label: str) -> str:
    """The printed line that starts with ``label``, without it."""
    return next(line for line in out.splitlines() if line.startswith(label))[len(label):]


def test_print_summary(hand_summary):
    out = _printed(hand_summary)
    assert "1.084" in out and f"{hand_summary['complexity_ratio']['value']:.3f}" in out and "wall time: 12.5 s" in out


def test_rows_hold_ours_beside_the_paper(hand_summary):
    out = _printed(hand_summary)
    assert _row(out, "complexity ratio nat/syn").split() == ["1.084", "1.237", "[1.112,", "1.359]", "p", "=",
                                                             "0.0123", "1.012", "[0.988,", "1.035]"]
    assert _row(out, "entropy divergence (JS, nats)").split() == ["0.015", "-", "0.166", "0.042", "\u2013", "0.247",
                                                                  "0.003", "\u2013", "0.006"]
    assert "3.333 \u00b1 0.044 (n=3)" in _row(out, "texture-analysis heads H (nats)")
    # the role table says which rules the random-weights control makes uninformative
    assert _row(out, "texture_analysis").split()[-1] == "uninformative"
    assert _row(out, "edge_detection").split()[-1] == "under-powered"
    assert "12.3% \u2013 87.7%" in _row(out, "ablation degradation")
    assert _row(out, "mean head entropy (nats)").split()[1:] == ["2.718", "4.051"]
    assert "7/3 = 2.333" in _row(out, "circuit size nat/syn")
    top = [line.split() for line in out.splitlines() if line.startswith("natural ")]
    assert top == [["natural", "900", "mid_block.attentions.0", "1", "87.7", "[70.1,", "99.4]", "0.0062"]]


def test_changed_summary_changes_the_printout(hand_summary):
    hand_summary["complexity_ratio"].update(value=0.913, ci_low=0.871, ci_high=0.95, p_value=0.5)
    hand_summary["degradation"] = None
    hand_summary["meta"]["wall_time_s"] = 3
    out = _printed(hand_summary)
    assert _row(out, "complexity ratio nat/syn").split()[:7] == ["1.084", "0.913", "[0.871,", "0.950]", "p", "=",
                                                                 "0.5000"]
    assert "87.7" not in out and "1.237" not in out and "wall time: 3.0 s" in out


def test_controls_are_printed_pooled_and_per_timestep(hand_summary, hand_controls):
    hand_summary["controls"] = hand_controls
    out = _printed(hand_summary)
    assert _row(out, "framing ").split() == ["5", "/", "5", "0.981", "[0.975,", "0.987]", "-1.23", "[-1.90,", "-0.61]",
                                            "p", "\u2264", "0.0005,", "the", "floor", "of", "2000", "permutations",
                                            "0.952", "[0.941,", "0.964]", "explained", "0.60", "[0.41,", "0.77]"]
    assert _row(out, "100 ").split() == ["0.921", "[0.910,", "0.933]", "framing", "0.962", "[0.950,", "0.970]", "-2.10",
                                         "[-2.80,", "-1.40]", "explained", "0.52", "[0.33,", "0.69]"]
    assert "relative -0.08 [-0.31, 0.16]" in _row(out, "seen ")
    hand_summary["controls"] = None
    assert "explained" not in _printed(hand_summary)
