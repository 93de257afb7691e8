"""Every bad input of the op's contract raises a clear error that names the argument."""

import os
import subprocess
import sys

import pytest
import torch

from diffcirc.ops import attention, extension

B, H, NQ, NK, D = 2, 3, 6, 10, 8


def qkv(dtype=torch.float32):
    return torch.randn(B, H, NQ, D, dtype=dtype), torch.randn(B, H, NK, D, dtype=dtype), torch.randn(B, H, NK, D, dtype=dtype)


q, k, v = qkv()
KG = torch.arange(B * NK).reshape(B, NK) % 5 - 1  # every id of [-1, 4): the id-range cases rewrite -1 and 3


def kgm(**kw):
    """attention asking for key_group_mass, key_groups = KG and n_groups = 4 unless overridden."""
    return attention(q, k, v, **{"stats": ("key_group_mass",), "key_groups": KG, "n_groups": 4, **kw})


BAD = {
    "q rank": (lambda: attention(q[0], k, v), "q must be 4-D"),
    "k rank": (lambda: attention(q, k[0], v), "k must be 4-D"),
    "int dtype": (lambda: attention(q.long(), k.long(), v.long()), "q must be float32, float16 or bfloat16"),
    "float64": (lambda: attention(q.double(), k.double(), v.double()), "q must be float32, float16 or bfloat16"),
    "mixed dtypes": (lambda: attention(q, k.half(), v), "q, k, v must share a dtype"),
    "batch mismatch": (lambda: attention(q, k[:1], v[:1]), "must share (B, H)"),
    "head dim mismatch": (lambda: attention(q, k[..., :4], v), "k must have head dim D = 8"),
    "v rows": (lambda: attention(q, k, v[:, :, :5]), "v must have Nk = 10"),
    "head dim too large": (lambda: attention(*(torch.randn(1, 1, 2, 513) for _ in range(3))), "head dim D must be in [1, 512]"),
    "scale nan": (lambda: attention(q, k, v, scale=float("nan")), "scale must be finite"),
    "mask dtype": (lambda: attention(q, k, v, key_padding_mask=torch.ones(B, NK)), "key_padding_mask must be bool of shape (B, Nk) = (2, 10), got float32 (2, 10)"),
    "mask shape": (lambda: attention(q, k, v, key_padding_mask=torch.ones(B, NQ, dtype=torch.bool)), "key_padding_mask must be bool of shape (B, Nk) = (2, 10)"),
    "head_scale shape": (lambda: attention(q, k, v, head_scale=torch.ones(B, H, 1)), "head_scale must be floating of shape (B, H) = (2, 3) or (H,) = (3,)"),
    "head_scale int": (lambda: attention(q, k, v, head_scale=torch.ones(B, H, dtype=torch.long)), "head_scale must be floating"),
    "replacement shape": (lambda: attention(q, k, v, head_replacement=torch.zeros(B, H, NQ, 3)), "head_replacement must be floating of shape (B|1, H, Nq|1, Dv)"),
    "replacement rank": (lambda: attention(q, k, v, head_replacement=torch.zeros(H, NQ, D)), "head_replacement must be floating"),
    "unknown stat": (lambda: attention(q, k, v, stats=("entropy", "kurtosis")), "unknown statistic(s) ['kurtosis']"),
    "distance without grid": (lambda: attention(q, k, v, stats=("distance",)), "stats 'distance' needs grid"),
    "grid mismatch": (lambda: attention(q, k, v, stats=("distance",), grid=((2, 2), (2, 5))), "does not match Nq = 6, Nk = 10"),
    "grid malformed": (lambda: attention(q, k, v, grid=(2, 3)), "grid must be ((hq, wq), (hk, wk))"),
    "label_mass without labels": (lambda: attention(q, k, v, stats=("label_mass",)), "stats 'label_mass' needs labels"),
    "labels shape": (lambda: attention(q, k, v, stats=("label_mass",), labels=(torch.zeros(B, NK, dtype=torch.long), torch.zeros(B, NK, dtype=torch.long))), "q_labels must be an integer tensor of shape (2, 6)"),
    "labels float": (lambda: attention(q, k, v, stats=("label_mass",), labels=(torch.zeros(B, NQ), torch.zeros(B, NK))), "q_labels must be an integer tensor"),
    "labels single": (lambda: attention(q, k, v, labels=torch.zeros(B, NQ, dtype=torch.long)), "labels must be a pair"),
    "not a tensor": (lambda: attention(q.numpy(), k, v), "q must be a torch.Tensor"),
    "head dim zero": (lambda: attention(*(torch.randn(1, 1, 2, 0) for _ in range(3))), "head dim D must be in [1, 512], got 0"),
    "mixed devices": (lambda: attention(q, k.to("meta"), v), "q, k, v must be on one device, got cpu, meta, cpu"),
    "mask device": (lambda: attention(q, k, v, key_padding_mask=torch.ones(B, NK, dtype=torch.bool, device="meta")),
                    "key_padding_mask must be on cpu, got meta"),
    "key_group_mass without key_groups": (lambda: kgm(key_groups=None, n_groups=None),
                                          "stats 'key_group_mass' needs key_groups (B, Nk) = (2, 10) and n_groups"),
    "key_groups without the stat": (lambda: kgm(stats=("entropy",)), "key_groups given but stats does not ask for 'key_group_mass'"),
    "n_groups without key_groups": (lambda: attention(q, k, v, n_groups=4), "n_groups = 4 given without key_groups (B, Nk) = (2, 10)"),
    "n_groups missing": (lambda: kgm(n_groups=None), "stats 'key_group_mass' needs n_groups"),
    "n_groups zero": (lambda: kgm(n_groups=0), "n_groups must be in [1, 65536], got 0"),
    "n_groups too large": (lambda: kgm(n_groups=65537), "n_groups must be in [1, 65536], got 65537"),
    "n_groups float": (lambda: kgm(n_groups=4.0), "n_groups must be an int, got float 4.0"),
    "n_groups bool": (lambda: kgm(n_groups=True), "n_groups must be an int, got bool True"),
    "key_groups shape": (lambda: kgm(key_groups=KG[:, :5]), "key_groups must be an integer tensor of shape (B, Nk) = (2, 10), got int64 (2, 5)"),
    "key_groups per head": (lambda: kgm(key_groups=KG[:, None].expand(B, H, NK)), "key_groups must be an integer tensor of shape (B, Nk) = (2, 10), got int64 (2, 3, 10)"),
    "key_groups float": (lambda: kgm(key_groups=KG.float()), "key_groups must be an integer tensor of shape (B, Nk) = (2, 10), got float32"),
    "key_groups bool": (lambda: kgm(key_groups=KG > 0), "key_groups must be an integer tensor"),
    "key_groups list": (lambda: kgm(key_groups=KG.tolist()), "key_groups must be an integer tensor of shape (B, Nk) = (2, 10), got list"),
    "key_groups device": (lambda: kgm(key_groups=KG.to("meta")), "key_groups must be on cpu, got meta"),
    "key_groups id too large": (lambda: kgm(key_groups=torch.where(KG == 3, 4, KG)),
                                "key_groups must hold ids in [-1, n_groups) = [-1, 4), got ids from -1 to 4 in key_groups (2, 10)"),
    "key_groups id below -1": (lambda: kgm(key_groups=torch.where(KG == -1, -2, KG)), "key_groups must hold ids in [-1, n_groups) = [-1, 4), got ids from -2"),
    "key_groups id wraps in int32": (lambda: kgm(key_groups=KG + (1 << 32)), "key_groups must hold ids in [-1, n_groups)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_clear_error(case):
    fn, message = BAD[case]
    with pytest.raises((ValueError, TypeError)) as err:
        fn()
    assert message in str(err.value)


@pytest.mark.parametrize("args,message", [
    ((q, k, v, 1.0, torch.ones(B, NK), None, None, [], None, None, False, False, False), "key_padding_mask must be bool"),
    ((q, k, v, 1.0, None, torch.ones(B, H, dtype=torch.float64), None, [], None, None, False, False, False), "head_scale must be float32"),
    ((q, k, v, 1.0, None, None, None, [], None, None, False, True, False), "stats 'distance' needs grid"),
    ((q, k, v, 1.0, None, None, None, [2, 3, 2, 4], None, None, False, True, False), "does not match Nq = 6, Nk = 10"),
    ((q, k, v, 1.0, None, None, None, [], torch.zeros(B, NQ, dtype=torch.long), torch.zeros(B, NK, dtype=torch.long), False, False, True), "must be int32"),
    ((q, k, v, 1.0, None, None, None, [], None, None, False, False, True), "needs q_labels and k_labels"),
    ((q.transpose(2, 3), k, v, 1.0, None, None, None, [], None, None, False, False, False), "contiguous last dim"),
    ((q, k, v, 1.0, None, None, None, [], None, None, False, False, False, KG, 4), "key_groups must be int32 of shape (B, Nk) = (2, 10), got Long"),
    ((q, k, v, 1.0, None, None, None, [], None, None, False, False, False, KG.int()[:, :9], 4), "key_groups must be int32 of shape (B, Nk) = (2, 10), got Int [2, 9]"),
    ((q, k, v, 1.0, None, None, None, [], None, None, False, False, False, KG.int(), 0), "n_groups must be in [1, 65536] with key_groups, got 0"),
    ((q, k, v, 1.0, None, None, None, [], None, None, False, False, False, KG.int(), 65537), "n_groups must be in [1, 65536]"),
    ((q, k, v, 1.0, None, None, None, [], None, None, False, False, False, None, 4), "n_groups = 4 given without key_groups (B, Nk) = (2, 10)"),
])
def test_direct_op_calls_are_checked_not_crashing(args, message):
    assert extension.load() is not None  # registers torch.ops.diffcirc.*
    with pytest.raises((ValueError, RuntimeError)) as err:
        torch.ops.diffcirc.attention(*args)
    assert message in str(err.value)


def test_last_dim_stride_is_handled_by_the_wrapper():
    qt = torch.randn(B, H, D, NQ).transpose(2, 3)  # last dim not contiguous
    r = attention(qt, k, v)
    assert torch.allclose(r.out, attention(qt.contiguous(), k, v).out)


def test_fallback_without_extension_warns_once_and_agrees():
    code = (
        "import warnings, torch\n"
        "warnings.simplefilter('always')\n"
        "from diffcirc.ops import attention\n"
        "torch.manual_seed(0)\n"
        "q, k, v = (torch.randn(1, 2, 9, 8) for _ in range(3))\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    a = attention(q, k, v, stats=('entropy',)); b = attention(q, k, v)\n"
        "print(sum('reference' in str(x.message) for x in w))\n"
        "print(torch.allclose(a.out, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-6))\n"
        "print(a.entropy.dtype)\n"
    )
    env = dict(os.environ, DIFFCIRC_DISABLE_EXTENSION="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout.split()
    assert out == ["1", "True", "torch.float32"]


def test_info_reports_the_build(capsys):
    # in this process (what `python -m diffcirc.info` runs): a fresh interpreter would add only its start-up
    from diffcirc.info import main

    assert main() == 0
    out = capsys.readouterr().out
    assert "extension (_C)" in out and "loaded" in out
    assert "cpu isa" in out and any(isa in out for isa in ("avx512", "avx2", "scalar"))
    assert "cuda kernels compiled for" in out


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="the oracle is Linux's /proc/cpuinfo")
def test_cpu_features_and_best_isa_match_the_flags_linux_reports():
    # the extension reads CPUID and XCR0 itself; Linux lists a feature only where the CPU has it and
    # the kernel supports it (AMX: tile state enabled), under its own names
    ext = extension.load()
    with open("/proc/cpuinfo") as f:
        flags = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    linux_names = {"avx512bf16": "avx512_bf16", "avx512fp16": "avx512_fp16", "amx-tile": "amx_tile",
                   "amx-bf16": "amx_bf16", "amx-fp16": "amx_fp16"}
    assert ext.cpu_features() == [name for name, flag in linux_names.items() if flag in flags]
    supported = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"} <= flags
    before = ext.cpu_isa()
    try:
        if supported:
            assert ext.set_cpu_isa("avx512bf16") == "avx512bf16"
        else:
            with pytest.raises(ValueError, match="does not support"):
                ext.set_cpu_isa("avx512bf16")
    finally:
        ext.set_cpu_isa(before)
