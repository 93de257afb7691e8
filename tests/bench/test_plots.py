"""diffcirc.bench.plots: PNG figures from result rows (the op and sweep figures are also written by
the CLI runs in tests/cli/test_bench.py)."""

from diffcirc.bench.plots import write_plots, write_unet_plots


def _written(paths, folder, names):
    assert [p.split("/")[-1] for p in paths] == names
    for name in names:
        assert (folder / name).stat().st_size > 1000, name


def test_unet_plots_from_rows(tmp_path):
    rows = [{"case": f"{case} 16x16", "implementation": impl, "ms": ms, "ms_min": ms * 0.9, "ms_max": ms * 1.2,
             "vs_sdpa": ms / 10.0, "peak_extra_bytes": int(ms) * 2**20}
            for case in ("sd-block w320", "tiny-unet b2") for impl, ms in (("sdpa", 10.0), ("fused", 8.0))]
    paths = write_unet_plots(rows, str(tmp_path), title="test")
    _written(paths, tmp_path, ["unet_time.png", "unet_speedup_vs_sdpa.png", "unet_memory.png"])


def test_op_plots_from_rows_with_a_skipped_row(tmp_path):
    rows = [{"implementation": impl, "dtype": "f32", "d": 64, "n": n, "ms": ms * n, "gflops": 1.0 / ms,
             "vs_sdpa": ms, "peak_extra_bytes": n * 1000} for impl, ms in (("sdpa", 1.0), ("fused", 0.5))
            for n in (256, 512)]
    rows.append({"implementation": "materialising", "dtype": "f32", "d": 64, "n": 512, "skipped": "over budget"})
    paths = write_plots(rows, str(tmp_path), title="test")
    _written(paths, tmp_path, ["time_vs_n.png", "gflops_vs_n.png", "memory_vs_n.png", "speedup_vs_sdpa.png"])
