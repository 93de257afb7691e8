"""``python -m diffcirc.info``: what was built and what will run (like ``python -m xformers.info``)."""

from __future__ import annotations

import platform

import torch


def build_info() -> dict:
    from diffcirc import __version__
    from diffcirc.ops import extension

    ext = extension.load()
    info = {
        "diffcirc": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "extension (_C)": "loaded" if ext is not None else "missing: using the float64 reference",
        "cpu isa": ext.cpu_isa() if ext is not None else "n/a",
        "cpu bf16/fp16 features": (", ".join(ext.cpu_features()) or "none") if ext is not None else "n/a",
        "cpu threads": torch.get_num_threads(),
        "blas for kernel gemms": ext.blas_backend() if ext is not None else "n/a",
        "cuda kernels compiled for": (", ".join(ext.cuda_archs()) or "none") if ext is not None else "none",
        "torch cuda": torch.version.cuda or "none (CPU build)",
    }
    return info


def main() -> int:
    info = build_info()
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}} : {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
