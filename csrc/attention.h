// What every backend of the fused attention op shares: its result type, the argument checks
// (written once) and the output allocation. The schema is in attention.cpp; each backend
// registers its implementation at the bottom of its kernel file (cpu/attention_kernel.cpp,
// cuda/attention_kernel.cu).
#pragma once

#include <optional>
#include <tuple>
#include <utility>

#include <ATen/ATen.h>

namespace diffcirc {

// out (B, H, Nq, Dv) in q's dtype (memory laid out as (B, Nq, H, Dv), so merging heads back into
// diffusers' (B, N, H * Dv) is a free view), lse (B, H, Nq) float32, then entropy, distance and
// label_mass, each (B, H, Nq) float32 when asked for, else an empty (0,) tensor, then
// key_group_mass (B, H, Nq, G) float32, or (B, 1, Nq, G) summed over heads with sum_group_heads
// (uninitialised per head, zeroed when summed: each backend fills or adds into it), or an empty (0,) tensor.
using AttentionResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Largest number of key groups (n_groups) of key-group mass, on every backend. Group ids are int32;
// a poisoned row writes all G of its entries, and one query's G floats per head should stay a small
// row (256 KiB here): far beyond any prompt (CLIP 77, T5 512 tokens) or region map.
constexpr int64_t kMaxKeyGroups = int64_t{1} << 16;

// Validates what the kernels rely on; errors name the argument, the expected and the actual shape.
// q: (B, H, Nq, D), k: (B, H, Nk, D), v: (B, H, Nk, Dv), same dtype (f32/f16/bf16) and device,
// last dim contiguous; key_padding_mask bool (B, Nk); head_scale float32 (B, H);
// head_replacement float32 (B, H, Nq, Dv) (broadcast views allowed); grid [hq, wq, hk, wk] or [];
// labels int32 (B, Nq) and (B, Nk); key_groups int32 (B, Nk) with n_groups in [1, kMaxKeyGroups]
// (n_groups 0 without key_groups). Group ids are not range-checked here (that would synchronise
// with a GPU): the kernels count a key whose id is outside [0, n_groups) in no group.
void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& key_padding_mask,
                            const std::optional<at::Tensor>& head_scale,
                            const std::optional<at::Tensor>& head_replacement, at::IntArrayRef grid,
                            const std::optional<at::Tensor>& q_labels, const std::optional<at::Tensor>& k_labels,
                            bool want_distance, bool want_label_mass, const std::optional<at::Tensor>& key_groups,
                            int64_t n_groups);

// Allocates the outputs described above; key_group_mass is (B, H, Nq, n_groups) when n_groups > 0,
// (B, 1, Nq, n_groups) and zeroed when sum_group_heads.
AttentionResult allocate_attention_outputs(const at::Tensor& q, const at::Tensor& v, bool want_entropy,
                                           bool want_distance, bool want_label_mass, int64_t n_groups,
                                           bool sum_group_heads);

// Token-grid centres in [0, 1]^2 (row, col) of an (h, w) row-major grid, as two float32 (h * w,) tensors.
std::pair<at::Tensor, at::Tensor> grid_centres(int64_t h, int64_t w, const at::TensorOptions& options);

}  // namespace diffcirc
