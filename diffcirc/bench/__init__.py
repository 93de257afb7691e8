"""Benchmark harness shared by ``benchmarks/`` and ``diffcirc bench``: timing, peak memory,
machine info, the correctness gate, JSON/CSV output, run comparison, plots and scaling fits."""
