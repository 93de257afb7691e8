// What the CUDA forward kernel of the fused attention op takes, its tile shapes per (dtype, head-dim
// bucket), and the launchers, one explicit instantiation group per head-dim bucket
// (attention_hdim<DP>.cu). Host-only code (attention_kernel.cu) includes this without the kernel.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace diffcirc::cuda {

// Everything one launch reads and writes. Element strides; the last dim of q, k, v is contiguous.
// Strides of size-1 dims are given as 0 (they are never stepped along).
struct AttentionParams {
  const void* q;  // (B, H, Nq, D) of T
  const void* k;  // (B, H, Nk, D)
  const void* v;  // (B, H, Nk, Dv)
  int64_t q_stride[3], k_stride[3], v_stride[3];
  int B, H, Nq, Nk, D, Dv;
  float scale;
  // 16-byte cp.async is used for a tensor only when its pointer, its strides and its row length
  // are multiples of 16 bytes; otherwise that tensor is read element by element.
  bool q_vec, k_vec, v_vec;

  const uint8_t* key_mask;  // bool (B, Nk), True = attend; nullptr = every key
  int64_t mask_stride[2];

  bool want_entropy, want_distance, want_label_mass;
  int grid_hq, grid_wq, grid_hk, grid_wk;  // token grids (distance only)
  const int32_t* q_label;                  // (B, Nq) (label_mass only)
  int64_t q_label_stride[2];
  const int32_t* k_label;  // (B, Nk)
  int64_t k_label_stride[2];
  const int32_t* key_groups;  // (B, Nk) (key_group_mass only); an id outside [0, n_groups) is in no group
  int64_t key_groups_stride[2];
  int n_groups;
  bool group_heads_summed;  // key_group_mass is (B, 1, Nq, n_groups): every head adds into its batch's rows

  const float* head_scale;  // (B, H) or nullptr (= 1)
  int64_t head_scale_stride[2];
  const float* replacement;  // (B, H, Nq, Dv) view (broadcast strides allowed) or nullptr
  int64_t replacement_stride[4];

  void* out;  // (B, H, Nq, Dv) of T, any strides
  int64_t out_stride[4];
  bool out_pairs;  // two neighbouring columns may be stored as one 2-element vector
  float* lse;      // (B, H, Nq) contiguous
  float* entropy;  // (B, H, Nq) contiguous, or nullptr
  float* distance;
  float* label_mass;
  float* key_group_mass;  // (B, H | 1, Nq, n_groups) contiguous, zeroed before the launch, or nullptr
};

// Head dims are padded up to one of these buckets (the max of D and Dv decides); each bucket is
// compiled in its own file, attention_hdim<DP>.cu. The one list of buckets: X(DP) for each.
#define DIFFCIRC_FOR_EACH_HEAD_DIM_BUCKET(X) X(32) X(64) X(96) X(128) X(160) X(192) X(256) X(512)

#define DIFFCIRC_BUCKET_VALUE(DP) DP,
constexpr int kHeadDimBuckets[] = {DIFFCIRC_FOR_EACH_HEAD_DIM_BUCKET(DIFFCIRC_BUCKET_VALUE)};
#undef DIFFCIRC_BUCKET_VALUE

constexpr int head_dim_bucket(int d) {
  for (int b : kHeadDimBuckets)
    if (d <= b) return b;
  return 0;
}

// Tile shapes. A block owns block_m = 16 * warps_m query rows of one (batch, head); each warp owns
// 16 rows and DP / warps_n output columns, and streams key tiles of block_n rows of K and V
// through a two-stage shared-memory ring. Shared memory holds the Q tile, the K/V ring (rows
// padded by 16 bytes so ldmatrix and the float4 reads hit distinct banks) and, per stage and key,
// the mask's keep word, grid centre and label. Every shape fits 99 KiB, the opt-in limit of the
// smallest sm_8x/sm_12x parts (sm_80 has 163 KiB, sm_90 227 KiB), so one binary serves all of them;
// at half precision up to DP = 128 (56 and 69 KiB) two blocks fit an sm_80 or sm_90 SM.
//
//             fp16 / bf16 (tensor cores)       fp32 (SIMT FMA)
//   DP        warps_m warps_n block_n          warps_m warps_n block_n
//   32, 64    8       1       64               4       1       32
//   96, 128   8       1       32               4       1       16
//   160, 192  4       1       32               4|2     1       16        (fp32: 4 for 160, 2 for 192)
//   256       4       1       16               2       1       8
//   512       2       2       16               1       2       8
//
// The output accumulator of a warp is 16 x (DP / warps_n) floats, 128 registers a thread at
// DP / warps_n = 256. For DP = 512 two warps share each 16 rows, each with half the columns, and
// both compute the same scores (S is recomputed, 1.5x the tensor-core work of an exact split, but
// no cross-warp softmax reduction is needed).
template <typename T, int DP>
struct TileConfig {
  static_assert(DP % 32 == 0 && DP <= 512, "head-dim bucket must be a multiple of 32, at most 512");
  static constexpr bool kF32 = std::is_same_v<T, float>;
  static constexpr int kWarpsN = DP == 512 ? 2 : 1;
  static constexpr int kWarpsM = kF32 ? (DP <= 160 ? 4 : DP <= 256 ? 2 : 1) : (DP <= 128 ? 8 : DP <= 256 ? 4 : 2);
  static constexpr int kBlockN = kF32 ? (DP <= 64 ? 32 : DP <= 192 ? 16 : 8) : (DP <= 64 ? 64 : DP <= 192 ? 32 : 16);
  static constexpr int kBlockM = 16 * kWarpsM;
  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte copy
  static constexpr int kLds = DP + kVec;                          // shared-memory row stride (elements)
  static constexpr int kStages = 2;
  // Blocks per SM the register budget is held to (__launch_bounds__): two at half precision up to
  // DP = 128, so that one block's barrier waits are covered by the other's maths.
  static constexpr int kMinBlocksPerSm = !kF32 && DP <= 128 ? 2 : 1;
  static constexpr int kSmemBytes = (kBlockM + 2 * kStages * kBlockN) * kLds * static_cast<int>(sizeof(T)) +
                                    kStages * kBlockN * 4 * static_cast<int>(sizeof(float));
  static_assert(kF32 || kBlockN % 16 == 0, "tensor-core tiles need key tiles of 16");
  static_assert(kSmemBytes <= 99 * 1024, "tile does not fit the 99 KiB shared-memory budget");
};

// Tile shape of the key-group-mass pass (attention_kernel.cuh): every warp owns 16 query rows (the
// forward's warps_n split for DP = 512 shares O's columns, which this pass does not compute) and
// key tiles are the forward's; one K tile at a time, the Q tile and each key's group in shared memory.
template <typename T, int DP>
struct GroupMassConfig {
  using Fwd = TileConfig<T, DP>;
  static constexpr int kWarps = Fwd::kWarpsM * Fwd::kWarpsN;
  static constexpr int kBlockM = 16 * kWarps;
  static constexpr int kBlockN = Fwd::kBlockN;
  static constexpr int kThreads = 32 * kWarps;
  // three blocks per SM at half precision and DP = 128, where 80 registers a thread suffice
  static constexpr int kMinBlocksPerSm = !Fwd::kF32 && DP == 128 ? 3 : 1;
  static constexpr int kLds = Fwd::kLds;
  static constexpr int kSmemBytes =
      (kBlockM + kBlockN) * kLds * static_cast<int>(sizeof(T)) + kBlockN * static_cast<int>(sizeof(int));
  static_assert(kSmemBytes <= 99 * 1024, "tile does not fit the 99 KiB shared-memory budget");
};

// Which per-element work a forward kernel compiles in. The lean variants (plain, entropy, masked)
// take the fast path of the main loop: 16-byte aligned rows copied with cp.async only, the row max
// taken over the raw scores with scale * log2(e) folded into the exponent (needs scale > 0), and
// poison read from each tile's block results; without a key mask, full key tiles test nothing per
// element (only the last, partial tile masks its padding keys). kFull keeps everything chosen at run time: any
// statistic (entropy, distance, label mass, from the AttentionParams flags), the key mask,
// unaligned rows, and any scale (the scores are scaled before the max). select_variant picks one.
enum class Variant : int { kPlain = 0, kEntropy = 1, kMasked = 2, kFull = 3 };

#define DIFFCIRC_FOR_EACH_VARIANT(X, T, DP) \
  X(T, DP, Variant::kPlain) X(T, DP, Variant::kEntropy) X(T, DP, Variant::kMasked) X(T, DP, Variant::kFull)

// The leanest variant that computes everything p asks for. Host code; scale > 0 excludes NaN, and
// the bound keeps scale * log2(e) finite.
inline Variant select_variant(const AttentionParams& p) {
  const bool lean = p.q_vec && p.k_vec && p.v_vec && p.scale > 0.f && p.scale <= 1e38f &&
                    !p.want_distance && !p.want_label_mass;
  if (!lean) return Variant::kFull;
  if (p.key_mask) return p.want_entropy ? Variant::kFull : Variant::kMasked;
  return p.want_entropy ? Variant::kEntropy : Variant::kPlain;
}

// Launches the forward kernel of variant V for dtype T (float, __half, __nv_bfloat16) and bucket
// DP on stream (on `device`, the current one); then, with key_group_mass, its second pass; returns
// the launch error, if any. Kernel attributes are set once per device. Defined in
// attention_kernel.cuh, instantiated per bucket.
template <typename T, int DP, Variant V>
cudaError_t launch_attention(const AttentionParams& p, cudaStream_t stream, int device);

#define DIFFCIRC_DECLARE_ATTENTION_VARIANT(T, DP, V) \
  extern template cudaError_t launch_attention<T, DP, V>(const AttentionParams&, cudaStream_t, int);
#define DIFFCIRC_DECLARE_ATTENTION_BUCKET(DP)                                \
  DIFFCIRC_FOR_EACH_VARIANT(DIFFCIRC_DECLARE_ATTENTION_VARIANT, float, DP)  \
  DIFFCIRC_FOR_EACH_VARIANT(DIFFCIRC_DECLARE_ATTENTION_VARIANT, __half, DP) \
  DIFFCIRC_FOR_EACH_VARIANT(DIFFCIRC_DECLARE_ATTENTION_VARIANT, __nv_bfloat16, DP)

DIFFCIRC_FOR_EACH_HEAD_DIM_BUCKET(DIFFCIRC_DECLARE_ATTENTION_BUCKET)

}  // namespace diffcirc::cuda
