"""What ran a benchmark: CPU, threads, torch, the extension's CPU ISA and BLAS, the GPU and CUDA
architectures compiled, and the commit when the package runs from a git checkout of itself."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import torch

from diffcirc.ops import extension

# the folder holding the diffcirc package: a source checkout's top level, or site-packages
PACKAGE_PARENT = Path(__file__).resolve().parents[2]


def commit(root: Path = PACKAGE_PARENT) -> str | None:
    """The short commit of the git checkout whose top level is root, or None: an installed package
    has none, and a site-packages inside some other repository must not report that one's."""
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel", "--short", "HEAD"],
                             capture_output=True, text=True, check=False).stdout.split()
    except OSError:
        return None
    if len(out) != 2 or Path(out[0]).resolve() != Path(root).resolve():
        return None
    return out[1]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def machine_info() -> dict:
    ext = extension.load()
    return {
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "isa": ext.cpu_isa() if ext else "reference (no extension)",
        "cpu_features": ext.cpu_features() if ext else [],
        "blas": ext.blas_backend() if ext else None,
        "commit": commit(),
    }


def cuda_machine_info() -> dict:
    info = machine_info()
    ext = extension.load()
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    info.update(gpu=props.name, capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                cuda_archs_compiled=ext.cuda_archs() if ext else [])
    return info


def full_machine_info(device: str = "cpu") -> dict:
    """machine_info plus the device, the CUDA version torch was built with and the GPU (on cuda)."""
    info = cuda_machine_info() if device == "cuda" else {**machine_info(), "cuda": torch.version.cuda, "gpu": None}
    info["device"] = device
    return info


def fused_path_warning(device: str) -> str | None:
    """Why 'fused' rows on device would not time the compiled kernel (the extension is not built,
    or has no CUDA kernels, so the op falls back to the float64 reference), or None."""
    ext = extension.load()
    if ext is None:
        return "diffcirc._C is not built; 'fused' rows time the float64 reference"
    if device == "cuda" and not ext.cuda_archs():
        return "diffcirc._C has no CUDA kernels; 'fused' rows time the float64 reference"
    return None
