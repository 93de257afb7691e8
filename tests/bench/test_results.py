"""diffcirc.bench.results: results.json / results.csv and comparing two runs."""

import csv
import json

import pytest

from diffcirc.bench import results

ROWS = [
    {"implementation": "sdpa", "dtype": "f32", "n": 64, "ms": 2.0, "extra": 7, "nested": {"a": 1}},
    {"implementation": "fused", "dtype": "f32", "n": 64, "ms": 1.0, "skipped": None, "later": "x"},
]


def test_results_files_round_trip(tmp_path):
    out = tmp_path / "new" / "folder"  # created on the way
    paths = results.write_results(out, {"cpu": "test"}, ROWS, fits=[{"time_exponent": 2.0}])
    assert paths == [str(out / "results.json"), str(out / "results.csv")]
    data = json.loads((out / "results.json").read_text())
    assert data == {"meta": {"cpu": "test"}, "results": ROWS, "fits": [{"time_exponent": 2.0}]}
    assert results.read_rows(out / "results.json") == ROWS
    with open(out / "results.csv") as f:
        reader = csv.DictReader(f)
        lines = list(reader)
    # CSV_FIELDS in their order first, then the others as first seen; nested values left out
    assert reader.fieldnames == ["implementation", "dtype", "n", "ms", "skipped", "extra", "later"]
    assert [line["implementation"] for line in lines] == ["sdpa", "fused"]
    assert lines[0]["extra"] == "7" and lines[1]["extra"] == "" and lines[0]["ms"] == "2.0"
    assert sorted(p.name for p in out.iterdir()) == ["results.csv", "results.json"]  # no temporary files left


class _Unprintable:
    def __str__(self):
        raise ValueError("no text")


def test_a_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "results.csv"
    results.write_csv(path, ROWS)
    before = path.read_text()
    with pytest.raises(ValueError, match="no text"):
        results.write_csv(path, [{"ms": 1.0}, {"ms": _Unprintable()}])  # fails after the first row
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]


def test_compare_flags_only_the_regressed_case():
    old = [{"n": 1, "implementation": "a", "ms": 10.0}, {"n": 1, "implementation": "b", "ms": 10.0}]
    new = [{"n": 1, "implementation": "a", "ms": 10.5}, {"n": 1, "implementation": "b", "ms": 12.0}]
    res = {c["key"]["implementation"]: c for c in results.compare(old, new, 10.0)}
    assert not res["a"]["regressed"] and res["b"]["regressed"]
    assert res["b"]["change_pct"] == pytest.approx(20.0)


def test_compare_matches_cases_by_their_key_fields_only():
    old = [{"n": 1, "d": 8, "implementation": "a", "ms": 10.0, "gflops": 1.0},
           {"n": 2, "d": 8, "implementation": "a", "ms": 1.0},
           {"n": 3, "d": 8, "implementation": "a", "skipped": "not installed"}]
    new = [{"n": 1, "d": 8, "implementation": "a", "ms": 5.0, "gflops": 9.0},  # other figures: the same case
           {"n": 2, "d": 16, "implementation": "a", "ms": 1.0},  # another head dim: another case
           {"n": 3, "d": 8, "implementation": "a", "ms": 1.0}]  # not timed before: nothing to compare
    (change,) = results.compare(old, new, 10.0)
    assert change == {"key": {"n": 1, "d": 8, "implementation": "a"}, "old_ms": 10.0, "new_ms": 5.0,
                      "change_pct": -50.0, "regressed": False}
