"""The manifest of resumable work units: what it vouches for and what it refuses."""

import json

import pytest

from diffcirc.analysis.units import ConfigMismatchError, WorkUnits


def finished(tmp_path):
    (tmp_path / "a.parquet").write_bytes(b"table a")
    (tmp_path / "b.parquet").write_bytes(b"table b")
    units = WorkUnits(tmp_path, {"x": 1})
    units.finish("a", ["a.parquet"])
    units.finish("b", ["b.parquet"], inputs=["a"])
    return units


def test_finished_units_are_done_until_a_file_or_an_input_changes(tmp_path):
    finished(tmp_path)
    again = WorkUnits(tmp_path, {"x": 1})
    assert again.done("a") and again.done("b") and not again.done("c")
    (tmp_path / "a.parquet").write_bytes(b"table a, recomputed differently")
    assert not again.done("a")
    again.finish("a", ["a.parquet"])
    assert not again.done("b")  # it read the old a


def test_other_configuration_is_refused(tmp_path):
    finished(tmp_path)
    with pytest.raises(ConfigMismatchError, match="different configuration"):
        WorkUnits(tmp_path, {"x": 2})


@pytest.mark.parametrize("units", [None, [], "text", {"a": "text"}, {"a": {"a.parquet": "0" * 64}},
                                   {"a": {"files": ["a.parquet"]}}, {"a": {"files": {}, "inputs": 3}}])
def test_malformed_or_old_manifest_vouches_for_nothing(tmp_path, units):
    first = finished(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["config_sha256"] == first.config_sha256
    manifest["units"] = units
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    again = WorkUnits(tmp_path, {"x": 1})
    assert not again.done("a") and not again.done("b")
    again.finish("a", ["a.parquet"])  # and it can be written again
    assert WorkUnits(tmp_path, {"x": 1}).done("a")


@pytest.mark.parametrize("text", ["", "{", "[1, 2]", "null"])
def test_unreadable_manifest_vouches_for_nothing(tmp_path, text):
    finished(tmp_path)
    (tmp_path / "manifest.json").write_text(text)
    assert not WorkUnits(tmp_path, {"x": 1}).done("a")
