"""A static report of the CUDA kernels' machine code, read from the built extension: no GPU needed.

``cuobjdump`` (the CUDA toolkit's, or the copy shipped inside triton) lists every kernel the
extension holds, per architecture (sm_80, sm_90, ...). For each (kernel, dtype, head-dim bucket,
arch) this reports what bounds a kernel's speed before it ever runs:

- registers per thread, spill (local memory) bytes, static shared memory, threads per block
  (``__launch_bounds__``), and the CTAs per SM that the register file allows (65536 registers
  per SM, allocated per warp in units of 256, at most 64 warps and 32 CTAs per SM on sm_80 and
  sm_90; the dynamic shared memory a launch asks for can lower it further);
- the main loop: the loop (a backward branch) that holds the most tensor-core instructions
  (HMMA), its instruction count, and its SASS instructions per HMMA, over the whole loop body and
  over its compute section between the first and last block barrier (BAR.SYNC) inside it, the
  figure FlashAttention-2's inner loop keeps near 4.

Counts are static (instructions in the code, not executed), so they are deterministic for a given
toolkit and the same on every machine.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import shutil
import subprocess
from typing import Optional

REGISTERS_PER_SM = 65536
REGISTER_UNIT = 256  # registers are allocated per warp in units of 256
MAX_WARPS_PER_SM = 64  # sm_80 and sm_90
MAX_CTAS_PER_SM = 32

_ARCH = re.compile(r"^\s*arch = (sm_\d+)")
_FUNCTION = re.compile(r"^\s*Function\s*:?\s*(\S+?):?\s*$")  # "Function : name" (-sass), "Function name:" (-res-usage)
_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_SECTION = re.compile(r"^\.nv\.info\.(\S+)")
_MAX_THREADS = re.compile(r"Value:\s+0x([0-9a-f]+) 0x([0-9a-f]+) 0x([0-9a-f]+)")
_KERNEL_NAME = re.compile(r"_ZN8diffcirc4cuda\d+(\w+?_kernel)I(\w+?)Li(\d+)E(?:LNS0_7VariantE(\d+)E)?")
_DTYPES = {"13__nv_bfloat16": "bf16", "6__half": "f16", "f": "f32"}
_VARIANTS = {"0": "plain", "1": "entropy", "2": "masked", "3": "full"}  # enum Variant, csrc/cuda/attention_params.h


class SassUnavailable(RuntimeError):
    """No cuobjdump, or an extension without CUDA machine code: nothing to report."""


@dataclasses.dataclass
class Instruction:
    address: int
    text: str  # e.g. "@!P0 BRA 0x14e0", "HMMA.16816.F32.BF16 R28, R96.reuse, R24, RZ"

    @property
    def opcode(self) -> str:
        words = self.text.split()
        return words[1] if words and words[0].startswith("@") and len(words) > 1 else (words[0] if words else "")

    def branch_target(self) -> Optional[int]:
        if not self.opcode.startswith("BRA"):
            return None
        m = re.search(r"0x([0-9a-f]+)", self.text.split("BRA", 1)[1])
        return int(m.group(1), 16) if m else None


@dataclasses.dataclass
class MainLoop:
    start: int  # address of the loop's first instruction (the backward branch's target)
    end: int  # address of the backward branch
    instructions: int  # in the body, NOPs excluded
    hmma: int
    compute_instructions: Optional[int]  # between the first and last BAR.SYNC in the body (None: fewer than 2)

    @property
    def per_hmma(self) -> float:
        return self.instructions / self.hmma

    @property
    def compute_per_hmma(self) -> Optional[float]:
        return None if self.compute_instructions is None else self.compute_instructions / self.hmma


def find_cuobjdump() -> str:
    """cuobjdump from PATH, CUDA_HOME/bin, /usr/local/cuda/bin or the copy inside triton."""
    candidates = [shutil.which("cuobjdump")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "cuobjdump"))
    try:
        import triton

        candidates += glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                                             "cuobjdump"))
    except ImportError:
        pass
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise SassUnavailable("cuobjdump not found (CUDA toolkit bin/, PATH, or triton's backends/nvidia/bin)")


def extension_path() -> str:
    """The built diffcirc._C shared library."""
    import importlib.util

    spec = importlib.util.find_spec("diffcirc._C")
    if spec is None or not spec.origin:
        raise SassUnavailable("diffcirc._C is not built")
    return spec.origin


def _run(tool: str, flags: list, path: str) -> str:
    done = subprocess.run([tool, *flags, path], capture_output=True, text=True, check=False)
    if "does not contain device code" in done.stderr:
        raise SassUnavailable(f"{path} holds no CUDA machine code (built without CUDA?)")
    if done.returncode != 0:
        raise SassUnavailable(f"{os.path.basename(tool)} {' '.join(flags)} {path} failed: "
                              f"{done.stderr.strip()[:300]}")
    return done.stdout


def parse_resources(text: str) -> dict:
    """``cuobjdump -res-usage`` output -> {(arch, function): (registers, stack, shared, local)}."""
    out, arch, function = {}, None, None
    for line in text.splitlines():
        if m := _ARCH.match(line):
            arch = m.group(1)
        elif m := _FUNCTION.match(line):
            function = m.group(1)
        elif (m := _RESOURCES.search(line)) and function:
            out[(arch, function)] = tuple(int(g) for g in m.groups())
            function = None
    return out


def parse_max_threads(text: str) -> dict:
    """``cuobjdump -elf`` output -> {(arch, function): threads per block from EIATTR_MAX_THREADS}."""
    out, arch, function, waiting = {}, None, None, False
    for line in text.splitlines():
        if m := _ARCH.match(line):
            arch = m.group(1)
        elif m := _SECTION.match(line.strip()):
            function, waiting = m.group(1), False
        elif "EIATTR_MAX_THREADS" in line:
            waiting = True
        elif waiting and (m := _MAX_THREADS.search(line)):
            x, y, z = (int(g, 16) for g in m.groups())
            out[(arch, function)] = x * y * z
            waiting = False
    return out


def parse_sass(text: str) -> dict:
    """``cuobjdump -sass`` output -> {(arch, function): [Instruction]} in address order."""
    out, arch, current = {}, None, None
    for line in text.splitlines():
        if m := _ARCH.match(line):
            arch = m.group(1)
        elif m := _FUNCTION.match(line):
            current = out.setdefault((arch, m.group(1)), [])
        elif current is not None and (m := _INSTRUCTION.search(line)):
            current.append(Instruction(int(m.group(1), 16), m.group(2).strip()))
    return out


def main_loop(instructions: list) -> Optional[MainLoop]:
    """The loop (backward branch) whose body holds the most HMMA instructions; None without HMMA."""
    best = None
    for i, ins in enumerate(instructions):
        target = ins.branch_target()
        if target is None or target > ins.address:
            continue
        body = [x for x in instructions[:i + 1] if x.address >= target]
        hmma = sum(x.opcode.startswith("HMMA") for x in body)
        if hmma and (best is None or hmma > best[1]):
            best = (body, hmma, target, ins.address)
    if best is None:
        return None
    body, hmma, start, end = best
    counted = [x for x in body if x.opcode != "NOP"]
    barriers = [k for k, x in enumerate(counted) if x.opcode.startswith("BAR.SYNC")]
    compute = barriers[-1] - barriers[0] - 1 if len(barriers) >= 2 else None
    return MainLoop(start, end, len(counted), hmma, compute)


def ctas_per_sm(registers: int, threads: int) -> int:
    """CTAs of ``threads`` threads at ``registers`` per thread that one SM's register file holds."""
    warps = -(-threads // 32)
    per_warp = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    by_registers = (REGISTERS_PER_SM // per_warp) // warps if per_warp else MAX_CTAS_PER_SM
    return max(0, min(by_registers, MAX_WARPS_PER_SM // warps, MAX_CTAS_PER_SM))


def describe_kernel(function: str) -> tuple:
    """(kernel, variant, dtype, head-dim bucket) of a mangled diffcirc kernel name, e.g.
    ("attention_fwd_kernel", "plain", "bf16", 128); the variant is "" for a kernel without one
    (key_group_mass_kernel); (function, "", "", 0) for another name."""
    m = _KERNEL_NAME.search(function)
    if not m:
        return function, "", "", 0
    variant = _VARIANTS.get(m.group(4), m.group(4)) if m.group(4) is not None else ""
    return m.group(1), variant, _DTYPES.get(m.group(2), m.group(2)), int(m.group(3))


def kernel_label(function: str) -> str:
    """"<kernel> <variant> <dtype> <head dim>" (no variant for a kernel without one), what
    ``report(kernels=...)`` searches: "attention_fwd_kernel plain bf16 64", "key_group_mass_kernel f16 128"."""
    return " ".join(str(x) for x in describe_kernel(function) if x != "")


def resource_usage(path: Optional[str] = None, tool: Optional[str] = None) -> dict:
    """{(arch, function): (registers, stack, shared, local bytes)} of every kernel of the extension at
    ``path`` (default: the built diffcirc._C), without disassembling any; SassUnavailable when it
    holds no CUDA machine code."""
    path = path or extension_path()
    resources = parse_resources(_run(tool or find_cuobjdump(), ["-res-usage"], path))
    if not resources:
        raise SassUnavailable(f"{path} holds no CUDA machine code (built without CUDA?)")
    return resources


def report(path: Optional[str] = None, tool: Optional[str] = None, kernels: Optional[str] = None) -> list:
    """One row per (arch, kernel, dtype, head dim) of the extension at ``path`` (default: the built
    diffcirc._C), sorted; SassUnavailable when it holds no CUDA machine code.

    kernels: a regular expression searched in kernel_label (e.g.
    "attention_fwd_kernel (plain|entropy) bf16 64"); only the matching kernels are disassembled (all: ~1M lines)."""
    path = path or extension_path()
    tool = tool or find_cuobjdump()
    resources = resource_usage(path, tool)
    names = sorted({f for _, f in resources})
    if kernels is not None:
        names = [f for f in names if re.search(kernels, kernel_label(f))]
        if not names:
            raise SassUnavailable(f"no kernel of {path} matches {kernels!r}")
        code = parse_sass(_run(tool, ["-sass", "-fun", ",".join(names)], path))
    else:
        code = parse_sass(_run(tool, ["-sass"], path))
    threads = parse_max_threads(_run(tool, ["-elf"], path))
    rows = []
    for (arch, function), instructions in code.items():
        kernel, variant, dtype, head_dim = describe_kernel(function)
        regs, stack, shared, local = resources.get((arch, function), (0, 0, 0, 0))
        n_threads = threads.get((arch, function))
        loop = main_loop(instructions)
        rows.append({
            "arch": arch, "kernel": kernel, "variant": variant, "dtype": dtype, "head_dim": head_dim, "registers": regs,
            "spill_bytes": local, "stack_bytes": stack, "static_shared_bytes": shared, "threads": n_threads,
            "ctas_per_sm_by_registers": ctas_per_sm(regs, n_threads) if n_threads else None,
            "instructions": len(instructions),
            "loop_instructions": loop.instructions if loop else None, "loop_hmma": loop.hmma if loop else 0,
            "per_hmma": round(loop.per_hmma, 2) if loop else None,
            "compute_per_hmma": round(loop.compute_per_hmma, 2) if loop and loop.compute_per_hmma else None,
        })
    return sorted(rows, key=lambda r: (r["arch"], r["kernel"], r["head_dim"], r["dtype"], r["variant"]))


HEADER = (f"{'arch':6} {'kernel':22} {'variant':7} {'dtype':5} {'D':>4} {'regs':>5} {'spill':>6} {'threads':>7} "
          f"{'CTAs/SM':>7} {'HMMA':>5} {'instr/HMMA':>10} {'compute/HMMA':>12}")


def format_row(r: dict) -> str:
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    return (f"{r['arch']:6} {r['kernel']:22} {r['variant']:7} {r['dtype']:5} {r['head_dim']:>4} {r['registers']:>5} "
            f"{r['spill_bytes']:>6} {fmt(r['threads'], '>7')} {fmt(r['ctas_per_sm_by_registers'], '>7')} "
            f"{r['loop_hmma']:>5} {fmt(r['per_hmma'], '>10.2f')} {fmt(r['compute_per_hmma'], '>12.2f')}")
