"""The joint-attention benchmark (diffcirc.bench.joint, ``diffcirc bench joint``): the case's layout,
the gate against float64 probabilities computed here, a planted wrong map refused, the CLI's rows."""

import json

import pytest
import torch

from diffcirc.bench import gate, joint
from diffcirc.cli import main as cli_main
from diffcirc.cli.bench import EXIT_REFUSED

SMALL = {"h": 2, "n_img": 48, "n_txt": 16, "d": 16}


def test_case_puts_each_text_token_in_its_own_group_and_image_keys_in_none():
    case = joint.make_joint_case(1, **SMALL, dtype=torch.float32)
    groups = case["key_groups"][0]
    assert groups[:16].tolist() == list(range(16)) and (groups[16:] == -1).all()
    assert case["q"].shape == (1, 2, 64, 16) and case["n_groups"] == 16


def test_every_implementation_passes_the_gate_and_the_map_is_the_text_columns():
    case = joint.make_joint_case(1, **SMALL, dtype=torch.float32)
    q, k = case["q"].double(), case["k"].double()
    probabilities = torch.softmax(q @ k.transpose(-1, -2) / 16 ** 0.5, dim=-1)  # (1, H, N, N), float64
    ref = joint.reference(case)
    text_mass = probabilities[..., :16].sum(dim=1, keepdim=True)  # summed over heads: (1, 1, N, 16)
    torch.testing.assert_close(ref.key_group_mass, text_mass[:1], rtol=0, atol=1e-12)
    for name, fn in joint.IMPLEMENTATIONS.items():
        assert joint.check(name, fn, case, torch.float32, ref) <= gate.TOLERANCES[torch.float32]
        _, mass = fn(case)
        if mass is not None:
            torch.testing.assert_close(mass.double(), text_mass, rtol=0, atol=1e-5)


def _shifted_map(c):
    out, mass = joint.fused_key_group_mass(c)
    return out, mass.roll(1, dims=-1)  # each token's mass reported one token late


def test_a_map_off_by_one_token_is_refused():
    case = joint.make_joint_case(1, **SMALL, dtype=torch.float32)
    with pytest.raises(gate.IncorrectImplementation, match="shifted"):
        joint.check("shifted", _shifted_map, case, torch.float32, joint.reference(case))


def test_cli_writes_one_row_per_implementation_with_ratios(tmp_path, capsys):
    out = tmp_path / "joint"
    assert cli_main(["bench", "joint", "--quick", "--dtype", "f32", "--threads", "1", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["results"]
    assert [r["implementation"] for r in rows] == list(joint.IMPLEMENTATIONS)
    sdpa_ms = rows[0]["ms"]
    for r in rows:
        assert r["n"] == joint.QUICK["n_img"] + joint.QUICK["n_txt"] and r["h"] == joint.QUICK["h"]
        assert r["vs_sdpa"] == pytest.approx(r["ms"] / sdpa_ms)
        assert r["peak_extra_bytes"] >= 0
    printed = capsys.readouterr().out
    assert "fused + key-group mass / fused:" in printed and "peak memory:" in printed


def test_cli_refuses_a_wrong_map_before_timing_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(joint.IMPLEMENTATIONS, "fused+key-group mass", _shifted_map)
    out = tmp_path / "joint"
    rc = cli_main(["bench", "joint", "--quick", "--dtype", "f32", "--impl", "fused+key-group mass", "--out", str(out)])
    assert rc == EXIT_REFUSED and "refused" in capsys.readouterr().err
    assert not (out / "results.json").exists()
