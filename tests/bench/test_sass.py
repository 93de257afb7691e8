"""The static machine-code report (diffcirc.bench.sass, ``diffcirc bench sass``): parsing cuobjdump's
listings written here, the main loop's counts and the register-file occupancy against hand counts,
and the report of the extension this checkout built."""

import json

import pytest

from diffcirc.bench import sass
from diffcirc.cli import main as cli_main
from diffcirc.ops import extension

FWD = "_ZN8diffcirc4cuda20attention_fwd_kernelI13__nv_bfloat16Li64ELNS0_7VariantE0EEEvNS0_15AttentionParamsE"
FULL = "_ZN8diffcirc4cuda20attention_fwd_kernelIfLi512ELNS0_7VariantE3EEEvNS0_15AttentionParamsE"
GROUP = "_ZN8diffcirc4cuda21key_group_mass_kernelI6__halfLi128EEEvNS0_15AttentionParamsE"


def _sass(arch: str, function: str, body: list) -> str:
    """A listing as cuobjdump -sass prints it: a header, then one line per instruction (and the
    second line of each 128-bit encoding, which carries no instruction)."""
    lines = ["", "Fatbin elf code:", "================", f"arch = {arch}", "code version = [1,8]", "",
             f"\tcode for {arch}", f"\t\tFunction : {function}", '\t.headerflags\t@"EF_CUDA_SM90"']
    for i, text in enumerate(body):
        lines.append(f"        /*{16 * i:04x}*/                   {text} ;        /* 0x000000000000 */")
        lines.append("                                                    /* 0x000fe20000000800 */")
    return "\n".join(lines) + "\n"


def _loop_program():
    """Instruction 0..; a prologue, a small loop with 1 HMMA, then the main loop (addresses
    0x60..0x130) with 4 HMMA, 2 barriers and a NOP, a forward branch out of it and the exit."""
    body = ["LDC R1, c[0x0][0x28]", "MOV R2, RZ",
            "HMMA.16816.F32.BF16 R4, R8, R10, R4", "IADD3 R2, R2, 0x1, RZ", "@P0 BRA 0x20",  # loop 0x20..0x40
            "S2R R3, SR_TID.X",
            "LDGSTS.E.128 [R5], desc[UR4][R6.64]",  # 0x60: main loop starts
            "BAR.SYNC.DEFER_BLOCKING 0x0",
            "LDSM.16.M88.4 R12, [R5]", "HMMA.16816.F32.BF16 R16, R12, R14, RZ", "HMMA.16816.F32.BF16 R18, R12, R15, RZ",
            "FMUL R20, R16, 0.5", "NOP", "@!P1 BRA 0x110",
            "MUFU.EX2 R21, R20", "HMMA.16816.F32.BF16 R22, R12, R14, R22", "HMMA.16816.F32.BF16 R24, R12, R15, R24",
            "BAR.SYNC.DEFER_BLOCKING 0x0",
            "IADD3 R7, R7, 0x1, RZ", "@P2 BRA 0x60",  # 0x130: the backward branch to the main loop
            "EXIT"]
    return body


def test_main_loop_is_the_loop_with_most_hmma_and_counts_its_body():
    code = sass.parse_sass(_sass("sm_90", FWD, _loop_program()))
    instructions = code[("sm_90", FWD)]
    assert len(instructions) == 21
    loop = sass.main_loop(instructions)
    assert (loop.start, loop.end) == (0x60, 0x130)
    # 14 instructions from LDGSTS to the backward branch, 13 without the NOP; 4 HMMA
    assert loop.instructions == 13 and loop.hmma == 4 and loop.per_hmma == pytest.approx(13 / 4)
    # between the two barriers: LDSM .. the second pair of HMMA, 8 instructions once the NOP is left out
    assert loop.compute_instructions == 8 and loop.compute_per_hmma == pytest.approx(2.0)


def test_code_without_hmma_has_no_main_loop():
    code = sass.parse_sass(_sass("sm_80", FWD, ["MOV R1, RZ", "@P0 BRA 0x0", "EXIT"]))
    assert sass.main_loop(code[("sm_80", FWD)]) is None


@pytest.mark.parametrize("registers, threads, ctas", [
    (158, 256, 1),   # 5120 registers per warp: 12 warps fit, a CTA is 8
    (72, 256, 3),    # 2304 -> 28 warps: 3 CTAs
    (64, 128, 8),    # 2048 -> 32 warps, 4 per CTA
    (32, 64, 32),    # the 32-CTA limit (and 64 warps) binds first
    (255, 1024, 0),  # 8192 per warp: 8 warps, less than one CTA of 32
])
def test_ctas_per_sm_from_the_register_file(registers, threads, ctas):
    assert sass.ctas_per_sm(registers, threads) == ctas


def test_resources_and_threads_are_read_per_arch_and_function():
    res = ("\nFatbin elf code:\narch = sm_80\nResource usage:\n Function " + FWD + ":\n"
           "  REG:154 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:936\n"
           "\nFatbin elf code:\narch = sm_90\nResource usage:\n Function " + FWD + ":\n"
           "  REG:158 STACK:16 SHARED:512 LOCAL:24 CONSTANT[0]:936\n")
    assert sass.parse_resources(res) == {("sm_80", FWD): (154, 0, 1024, 0), ("sm_90", FWD): (158, 16, 512, 24)}
    elf = ("arch = sm_90\n.nv.info." + GROUP + "\n\t<0x1>\n\tAttribute:\tEIATTR_CRS_STACK_SIZE\n\tValue:\t0x0\n"
           "\t<0x2>\n\tAttribute:\tEIATTR_MAX_THREADS\n\tFormat:\tEIFMT_SVAL\n\tValue:\t0x100 0x1 0x1 \n")
    assert sass.parse_max_threads(elf) == {("sm_90", GROUP): 256}


def test_kernel_names_are_demangled_to_kernel_dtype_and_bucket():
    assert sass.describe_kernel(FWD) == ("attention_fwd_kernel", "plain", "bf16", 64)
    assert sass.describe_kernel(FULL) == ("attention_fwd_kernel", "full", "f32", 512)
    assert sass.describe_kernel(GROUP) == ("key_group_mass_kernel", "", "f16", 128)
    assert sass.describe_kernel("other") == ("other", "", "", 0)
    assert sass.kernel_label(FWD) == "attention_fwd_kernel plain bf16 64"
    assert sass.kernel_label(GROUP) == "key_group_mass_kernel f16 128"


def test_report_of_the_built_extension(tmp_path, capsys):
    ext = extension.load()
    archs = list(ext.cuda_archs()) if ext is not None else []
    try:
        tool = sass.find_cuobjdump()
    except sass.SassUnavailable:
        pytest.skip("no cuobjdump on this machine (CUDA toolkit or triton)")
    # one head-dim bucket (the whole extension is ~1M lines of SASS)
    rc = cli_main(["bench", "sass", "--kernels", "attention_fwd_kernel plain (f16|bf16) 64$", "--out", str(tmp_path)])
    if not archs:  # a CPU-only build: said, not a traceback
        assert rc == 2 and "holds no CUDA machine code" in capsys.readouterr().err
        return
    assert rc == 0, capsys.readouterr().err
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    compiled = {f"sm_{a.replace('.', '').replace('+PTX', '')}" for a in archs}
    assert {r["arch"] for r in rows} == compiled, tool
    assert sorted((r["kernel"], r["variant"], r["dtype"], r["head_dim"]) for r in rows) == sorted(
        ("attention_fwd_kernel", "plain", dtype, 64) for dtype in ("f16", "bf16") for _ in compiled)
    for r in rows:  # a half-precision forward runs its main loop on the tensor cores
        assert r["loop_hmma"] > 0 and r["per_hmma"] > 1 and r["registers"] > 0 and r["threads"]


def test_a_filter_that_matches_no_kernel_is_said(tmp_path, capsys, monkeypatch):
    listing = "arch = sm_90\nResource usage:\n Function " + FWD + ":\n  REG:10 STACK:0 SHARED:0 LOCAL:0\n"
    monkeypatch.setattr(sass, "_run", lambda tool, flags, path: listing)
    with pytest.raises(sass.SassUnavailable, match="no kernel of ext.so matches 'attention_fwd_kernel full f32'"):
        sass.report("ext.so", "cuobjdump", kernels="attention_fwd_kernel full f32")


# Issue 16's bounds on the forward kernel's machine code, at head dims 64 and 128, f16 and bf16, on
# sm_80 and sm_90: the plain variant's main loop at most 6 SASS instructions per HMMA, the entropy
# variant's at most 8 (FlashAttention-2 keeps near 4); two blocks per SM by the register file for
# half precision up to head dim 128 (their shared memory, 56 and 69 KiB a block, fits twice in
# sm_80's 164 KiB and sm_90's 228 KiB); no spills in any forward kernel up to head dim 256.
BOUNDED_ARCHS = ("sm_80", "sm_90")
MAX_PER_HMMA = {"plain": 6.0, "entropy": 8.0}


def assert_forward_machine_code_bounds(path, tool):
    """Fails where the forward kernels of the extension (or object file) at path break the bounds above."""
    resources = sass.resource_usage(path, tool)
    archs = sorted({arch for arch, _ in resources} & set(BOUNDED_ARCHS))
    assert archs, f"{path} holds neither sm_80 nor sm_90 code"
    spilled = [(arch, sass.kernel_label(f), res[3]) for (arch, f), res in resources.items()
               if sass.describe_kernel(f)[0] == "attention_fwd_kernel" and 0 < sass.describe_kernel(f)[3] <= 256
               and res[3] > 0]
    assert not spilled, spilled
    rows = sass.report(path, tool, kernels="attention_fwd_kernel (plain|entropy) b?f16 (64|128)$")
    seen = {(r["arch"], r["variant"], r["dtype"], r["head_dim"]) for r in rows if r["arch"] in archs}
    assert seen == {(a, v, d, hd) for a in archs for v in MAX_PER_HMMA for d in ("f16", "bf16") for hd in (64, 128)}
    for r in (r for r in rows if r["arch"] in archs):
        where = (r["arch"], r["variant"], r["dtype"], r["head_dim"])
        assert r["loop_hmma"] > 0 and r["per_hmma"] <= MAX_PER_HMMA[r["variant"]], (where, r["per_hmma"])
        assert r["ctas_per_sm_by_registers"] >= 2, (where, r["registers"], r["threads"])


def test_forward_machine_code_within_the_issue_bounds():
    ext = extension.load()
    if ext is None or not list(ext.cuda_archs()):
        pytest.skip("the extension was built without CUDA")
    try:
        tool = sass.find_cuobjdump()
    except sass.SassUnavailable:
        pytest.skip("no cuobjdump on this machine (CUDA toolkit or triton)")
    assert_forward_machine_code_bounds(sass.extension_path(), tool)
