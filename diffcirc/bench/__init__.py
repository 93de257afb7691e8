"""The benchmarks behind ``diffcirc bench`` (``benchmarks/`` holds thin entry points over them).

Modules, one job each: cases (dtypes and random op inputs), gate (the correctness check every
implementation passes before it is timed), implementations (the op implementations compared,
optional GPU baselines, which failures skip one), measure (timers and peak memory, CPU and CUDA),
machine (what ran the benchmark), results (JSON/CSV files, comparing two runs), scaling (fitted
exponents of time and memory vs N), op (the op benchmark), workloads (the diffusers models and
inputs of the UNet benchmarks), processors (the attention processors the UNet benchmark
compares), unet (UNet forward passes), sweep (the batched ablation sweep), joint (a Flux-like joint
attention layer read as per-token heatmaps: SDPA, fused, fused + key-group mass, the materialising
map), plots (PNG figures).
Nothing here queries the GPU at import time.
"""
