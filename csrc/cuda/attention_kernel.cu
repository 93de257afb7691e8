// CUDA backend of the fused attention op: the shared argument checks, the outputs, the choice of
// head-dim bucket and dtype, the launch on the current stream, and (at the bottom) its
// registration. The kernel itself is in attention_kernel.cuh, compiled once per head-dim bucket
// (attention_hdim<DP>.cu) in a few variants (Variant, attention_params.h): the leanest one that
// computes what the call asks for is launched.
//
// Nothing is allocated besides the outputs: the key-padding mask, labels, key groups, head_scale and
// head_replacement are read in place through their strides, and grid centres are computed in the
// kernel. Key-group mass is zeroed on the stream and filled by a second kernel (attention_kernel.cuh). Nothing synchronises with the host. Only c10/cuda headers are used (not
// ATen/cuda/CUDAContext.h, which needs the cuBLAS/cuSPARSE headers that minimal toolkits lack).
#include <algorithm>
#include <cstdint>
#include <limits>
#include <map>
#include <mutex>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../attention.h"
#include "attention_params.h"

namespace diffcirc::cuda {
namespace {

// Size-1 dims are never stepped along; their stride can be anything, so it is passed as 0.
int64_t stride_of(const at::Tensor& t, int64_t dim) { return t.size(dim) == 1 ? 0 : t.stride(dim); }

// Whether rows of t (n_cols elements each) can be copied in 16-byte pieces.
bool rows_are_16b_aligned(const at::Tensor& t, int64_t n_cols) {
  const int64_t vec = 16 / t.element_size();
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0 || n_cols % vec != 0) return false;
  for (int64_t d = 0; d < 3; ++d)
    if (stride_of(t, d) % vec != 0) return false;
  return true;
}

// What the launch checks of a device, read once per device (each read is a driver call).
struct DeviceLimits {
  int major = 0, minor = 0, max_smem_optin = 0;
};

const DeviceLimits& device_limits(int device) {
  static std::mutex mutex;
  static std::map<int, DeviceLimits> cache;  // a std::map: references to its entries stay valid
  const std::lock_guard<std::mutex> lock(mutex);
  auto found = cache.find(device);
  if (found != cache.end()) return found->second;
  DeviceLimits limits;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limits.major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limits.minor, cudaDevAttrComputeCapabilityMinor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limits.max_smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return cache.emplace(device, limits).first->second;
}

template <typename T, int DP>
void launch(const AttentionParams& p) {
  using Cfg = TileConfig<T, DP>;
  const int64_t blocks = (static_cast<int64_t>(p.Nq) + Cfg::kBlockM - 1) / Cfg::kBlockM * p.B * p.H;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "attention: too many query tiles (", blocks,
              ") for one launch; split the batch");
  const int device = c10::cuda::current_device();
  const DeviceLimits& limits = device_limits(device);
  TORCH_CHECK(limits.major >= 8, "diffcirc's CUDA attention kernel needs compute capability 8.0 or newer, got ",
              limits.major, ".", limits.minor);
  TORCH_CHECK(Cfg::kSmemBytes <= limits.max_smem_optin, "attention: head-dim bucket ", DP, " needs ", Cfg::kSmemBytes,
              " bytes of shared memory per block, this GPU allows ", limits.max_smem_optin);
  using GroupCfg = GroupMassConfig<T, DP>;
  TORCH_CHECK(p.key_group_mass == nullptr || GroupCfg::kSmemBytes <= limits.max_smem_optin, "attention: key_group_mass "
              "for head-dim bucket ", DP, " needs ", GroupCfg::kSmemBytes, " bytes of shared memory per block, this GPU "
              "allows ", limits.max_smem_optin);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err = cudaSuccess;
  switch (select_variant(p)) {
    case Variant::kPlain: err = launch_attention<T, DP, Variant::kPlain>(p, stream, device); break;
    case Variant::kEntropy: err = launch_attention<T, DP, Variant::kEntropy>(p, stream, device); break;
    case Variant::kMasked: err = launch_attention<T, DP, Variant::kMasked>(p, stream, device); break;
    case Variant::kFull: err = launch_attention<T, DP, Variant::kFull>(p, stream, device); break;
  }
  C10_CUDA_CHECK(err);
}

template <typename T>
void launch_bucket(const AttentionParams& p) {
#define DIFFCIRC_LAUNCH_BUCKET(DP) \
  case DP: return launch<T, DP>(p);
  switch (head_dim_bucket(std::max(p.D, p.Dv))) {
    DIFFCIRC_FOR_EACH_HEAD_DIM_BUCKET(DIFFCIRC_LAUNCH_BUCKET)
    default: TORCH_CHECK(false, "attention: no CUDA kernel for head dims D = ", p.D, ", Dv = ", p.Dv);
  }
#undef DIFFCIRC_LAUNCH_BUCKET
}

// The CUDA implementation of torch.ops.diffcirc.attention (schema: attention.cpp; arguments and
// outputs: attention.h). q: (B, H, Nq, D), k: (B, H, Nk, D), v: (B, H, Nk, Dv) on one CUDA device.
AttentionResult attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                               const std::optional<at::Tensor>& key_padding_mask,
                               const std::optional<at::Tensor>& head_scale,
                               const std::optional<at::Tensor>& head_replacement, at::IntArrayRef grid,
                               const std::optional<at::Tensor>& q_labels, const std::optional<at::Tensor>& k_labels,
                               bool want_entropy, bool want_distance, bool want_label_mass,
                               const std::optional<at::Tensor>& key_groups, int64_t n_groups,
                               bool sum_group_heads) {
  check_attention_inputs(q, k, v, key_padding_mask, head_scale, head_replacement, grid, q_labels, k_labels,
                         want_distance, want_label_mass, key_groups, n_groups);
  TORCH_CHECK_VALUE(q.is_cuda(), "attention (CUDA): q must be a CUDA tensor, got ", q.device());
  const c10::cuda::CUDAGuard device_guard(q.device());
  auto result = allocate_attention_outputs(q, v, want_entropy, want_distance, want_label_mass, n_groups,
                                           sum_group_heads);
  auto& [out, lse, ent, dist, lab, group_mass] = result;
  if (lse.numel() == 0) return result;  // B, H or Nq is 0

  // The kernel indexes rows and tiles in int (element offsets are int64). Row indices run up to a
  // tile past N (tile counts are rounded up, rows of a partial tile are still formed), so N keeps
  // a margin of more than the largest tile below INT32_MAX.
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
  constexpr int64_t kMaxRows = kIntMax - 1024;
  TORCH_CHECK_VALUE(q.size(2) <= kMaxRows && k.size(2) <= kMaxRows && q.size(0) * q.size(1) <= kIntMax,
                    "attention (CUDA): Nq and Nk must be at most ", kMaxRows, " and B * H at most ", kIntMax,
                    ", got q ", q.sizes(), ", k ", k.sizes());

  AttentionParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  for (int64_t d = 0; d < 3; ++d) {
    p.q_stride[d] = stride_of(q, d);
    p.k_stride[d] = stride_of(k, d);
    p.v_stride[d] = stride_of(v, d);
  }
  p.B = static_cast<int>(q.size(0));
  p.H = static_cast<int>(q.size(1));
  p.Nq = static_cast<int>(q.size(2));
  p.D = static_cast<int>(q.size(3));
  p.Nk = static_cast<int>(k.size(2));
  p.Dv = static_cast<int>(v.size(3));
  p.scale = static_cast<float>(scale);
  p.q_vec = rows_are_16b_aligned(q, p.D);
  p.k_vec = p.Nk == 0 || rows_are_16b_aligned(k, p.D);
  p.v_vec = p.Nk == 0 || rows_are_16b_aligned(v, p.Dv);

  if (key_padding_mask) {
    p.key_mask = reinterpret_cast<const uint8_t*>(key_padding_mask->data_ptr<bool>());
    p.mask_stride[0] = key_padding_mask->stride(0);
    p.mask_stride[1] = key_padding_mask->stride(1);
  }
  p.want_entropy = want_entropy;
  p.want_distance = want_distance;
  p.want_label_mass = want_label_mass;
  if (want_distance) {
    p.grid_hq = static_cast<int>(grid[0]);
    p.grid_wq = static_cast<int>(grid[1]);
    p.grid_hk = static_cast<int>(grid[2]);
    p.grid_wk = static_cast<int>(grid[3]);
  }
  if (want_label_mass) {
    p.q_label = q_labels->data_ptr<int32_t>();
    p.q_label_stride[0] = q_labels->stride(0);
    p.q_label_stride[1] = q_labels->stride(1);
    p.k_label = k_labels->data_ptr<int32_t>();
    p.k_label_stride[0] = k_labels->stride(0);
    p.k_label_stride[1] = k_labels->stride(1);
  }
  if (key_groups) {
    p.key_groups = key_groups->data_ptr<int32_t>();
    p.key_groups_stride[0] = key_groups->stride(0);
    p.key_groups_stride[1] = key_groups->stride(1);
    p.n_groups = static_cast<int>(n_groups);  // <= kMaxKeyGroups (check_attention_inputs)
    p.group_heads_summed = sum_group_heads;
    if (!sum_group_heads) group_mass.zero_();  // on the current stream, before the kernels add to it
                                               // (allocated zeroed when summed)
    p.key_group_mass = group_mass.data_ptr<float>();
  }
  if (head_scale) {
    p.head_scale = head_scale->data_ptr<float>();
    p.head_scale_stride[0] = head_scale->stride(0);
    p.head_scale_stride[1] = head_scale->stride(1);
  }
  if (head_replacement) {
    p.replacement = head_replacement->data_ptr<float>();
    for (int64_t d = 0; d < 4; ++d) p.replacement_stride[d] = head_replacement->stride(d);
  }

  p.out = out.data_ptr();
  for (int64_t d = 0; d < 4; ++d) p.out_stride[d] = out.stride(d);
  p.out_pairs = out.stride(3) == 1 && out.stride(0) % 2 == 0 && out.stride(1) % 2 == 0 && out.stride(2) % 2 == 0 &&
                reinterpret_cast<uintptr_t>(out.data_ptr()) % (2 * out.element_size()) == 0;
  p.lse = lse.data_ptr<float>();
  p.entropy = want_entropy ? ent.data_ptr<float>() : nullptr;
  p.distance = want_distance ? dist.data_ptr<float>() : nullptr;
  p.label_mass = want_label_mass ? lab.data_ptr<float>() : nullptr;

  switch (q.scalar_type()) {
    case at::kFloat: launch_bucket<float>(p); break;
    case at::kHalf: launch_bucket<__half>(p); break;
    default: launch_bucket<__nv_bfloat16>(p); break;
  }
  return result;
}

}  // namespace
}  // namespace diffcirc::cuda

TORCH_LIBRARY_IMPL(diffcirc, CUDA, m) { m.impl("attention", &diffcirc::cuda::attention_cuda); }
