// CUDA forward kernel of the fused attention op (FlashAttention-2 structure), included by the
// per-bucket files attention_hdim<DP>.cu only.
//
// One thread block = one tile of block_m query rows of one (batch, head). The Q tile is copied to
// shared memory once; K and V tiles of block_n keys stream through a two-stage shared-memory ring
// (cp.async, so the copy of tile j + 1 overlaps the maths on tile j). Per key tile each warp
//   S = Q K^T            16 rows x block_n keys, fp32 accumulators in registers
//   p = e^{scale S - m}  online softmax + statistics (csrc/row_state.h), in registers
//   O = alpha O + P V    16 rows x (DP / warps_n) columns, fp32 accumulators in registers
// and at the end writes out = hs * O / l + (1 - hs) * replacement and the row statistics. The
// Nq x Nk matrix never exists; per block only a 16 x block_n tile of scores per warp does.
//
// fp16 / bf16 use tensor cores (mma.sync m16n8k16, fp32 accumulate, ldmatrix from shared
// memory). fp32 uses SIMT FMA in full fp32 (no TF32), laid out exactly like the mma accumulators,
// so the softmax, statistics and epilogue code is shared.
//
// Masking and non-finite logits follow the CPU kernel: a masked key or a -inf logit has weight 0,
// a fully masked row gives out = 0, lse = -inf and statistics 0, and a row that meets a NaN or
// +inf logit of an unmasked key (from NaN / inf inputs) gives NaN in out, lse and every statistic
// (row_state_poison); a masked key never poisons, whatever its logit. Masked keys become exactly
// -inf before anything else sees them (a bit select); poison is then read from each tile's
// results, no test per logit: a +inf tile max (a +inf logit) or a NaN sum (a NaN logit's p is NaN).
//
// Variants (Variant, attention_params.h): the per-score work a call does not need is compiled out.
// plain, entropy and masked are the lean ones, p = 2^{s * scale log2(e) - m log2(e)} (one FFMA
// and one EX2 per score) over raw scores s; full tiles without a mask test nothing per score
// (only the last, partial tile masks its padding), and K / V stream through running pointers.
// full keeps every run-time choice (any statistic, mask, unaligned rows, any scale).
//
// Register layout (the m16n8 accumulator): lane = 4 g + t holds, for each 8-column tile n,
// rows g and g + 8 at columns 8 n + 2 t and 8 n + 2 t + 1. The four lanes of a quad (same g)
// therefore share a row; row reductions are two xor-shuffles across the quad, after which all
// four lanes hold bit-identical copies of the row state.
//
// Key-group mass is a second kernel, launched after the forward one. Its state, G sums per row
// (G up to 512 for a T5 prompt), fits neither in registers nor in shared memory (128 rows x 512
// floats are 256 KiB), so it is not kept as an online-softmax accumulator here (the CPU kernel does
// that). Once the forward has written each row's final lse, p = e^{scale s - lse} is exact with no
// rescaling, and the second pass recomputes S = Q K^T for the key tiles that hold a grouped key only
// (skipping the others costs one read of their group ids), adding each p into the (B, H, Nq, G)
// output with a fire-and-forget global atomic add (red.global.add.f32). Its extra cost is that
// share of Q K^T plus one atomic per grouped key and query; G is bounded only by memory. Additions
// within a group run in no fixed order: sums of several keys may differ in the last bits between
// runs.
#pragma once

#include <atomic>
#include <cstdint>
#include <type_traits>

#include "../row_state.h"
#include "attention_params.h"

namespace diffcirc::cuda {
namespace detail {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ uint32_t smem_u32(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most N of this thread's committed copy groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Four 8x8 b16 matrices; lane l gives the shared-memory byte address (smem_u32) of row l % 8 of
// matrix l / 8. The address form lets the forward kernel keep its addresses in registers.
__device__ __forceinline__ void ldmatrix_x4_at(uint32_t (&r)[4], uint32_t addr) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#else
  __trap();
#endif
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) { ldmatrix_x4_at(r, smem_u32(smem)); }

// The same, each matrix transposed (V's k16 x n8 operands from its row-major tile).
__device__ __forceinline__ void ldmatrix_x4_trans_at(uint32_t (&r)[4], uint32_t addr) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#else
  __trap();
#endif
}

// x, opaque to the compiler: a value computed once stays in its register instead of being
// recomputed from the thread index inside a loop that is short of registers.
__device__ __forceinline__ uint32_t opaque(uint32_t x) {
  asm volatile("" : "+r"(x));
  return x;
}

// d += a (16x16, row-major) * b (16x8, column-major), fp32 accumulate.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#else
  __trap();
#endif
}

// Two floats -> one register of two T (the first in the low half), as the mma operands want them.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
}

template <typename T>
__device__ __forceinline__ T from_float(float x) {
  if constexpr (std::is_same_v<T, float>) return x;
  else if constexpr (std::is_same_v<T, __half>) return __float2half_rn(x);
  else return __float2bfloat16_rn(x);
}

// Stores out[c], out[c + 1] as one 4- or 8-byte access.
template <typename T>
__device__ __forceinline__ void store_pair(T* dst, float a, float b) {
  if constexpr (std::is_same_v<T, float>) *reinterpret_cast<float2*>(dst) = make_float2(a, b);
  else if constexpr (std::is_same_v<T, __half>) *reinterpret_cast<__half2*>(dst) = __floats2half2_rn(a, b);
  else *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(a, b);
}

// 16-byte asynchronous copy, or 16 zero bytes when !valid (src-size 0: nothing is read; gmem must
// still be an address inside the tensor).
__device__ __forceinline__ void cp_async_16_or_zero(void* smem, const void* gmem, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem),
               "r"(valid ? 16 : 0)
               : "memory");
#else
  *static_cast<uint4*>(smem) = valid ? *static_cast<const uint4*>(gmem) : make_uint4(0u, 0u, 0u, 0u);
#endif
}

// Copies the first ROWS rows x columns [0, DP) of a row-major global matrix that starts at src
// (the tile's first row; row stride ld; rows rows and n_cols columns are real) into shared memory
// (row stride LDS). Rows past `rows` and columns past n_cols are zero-filled by the same cp.async
// (every copy reads in bounds, and the zeros land with the copy group). With vec false the copy
// is synchronous, element by element (unaligned views; only the kFull variant has that path).
template <typename T, int DP, int LDS, int ROWS, int THREADS>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t ld, int rows, int n_cols, bool vec,
                                          int tid) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  constexpr int kChunks = DP / kVec;
  if (vec) {
    if constexpr (THREADS % kChunks == 0) {
      // each thread copies the same column chunk c of rows r0, r0 + kStep, ...: one address per
      // thread and tile (r0 * ld + c does not change from tile to tile), stepped by kStep rows
      constexpr int kStep = THREADS / kChunks;
      const int r0 = tid / kChunks, c = (tid % kChunks) * kVec;
      const T* const first = src + (static_cast<int64_t>(r0) * ld + c);
#pragma unroll
      for (int r = 0; r < ROWS; r += kStep) {
        if (ROWS % kStep != 0 && r0 + r >= ROWS) break;
        const bool valid = r0 + r < rows && c < n_cols;
        cp_async_16_or_zero(dst + (r0 + r) * LDS + c, valid ? first + r * ld : src, valid);
      }
    } else {
      constexpr int kTotal = ROWS * kChunks;
#pragma unroll
      for (int base = 0; base < kTotal; base += THREADS) {
        const int idx = base + tid;
        if (kTotal % THREADS != 0 && idx >= kTotal) break;
        const int r = idx / kChunks, c = (idx % kChunks) * kVec;
        const bool valid = r < rows && c < n_cols;
        cp_async_16_or_zero(dst + r * LDS + c, valid ? src + static_cast<int64_t>(r) * ld + c : src, valid);
      }
    }
  } else {
    using Bits = std::conditional_t<sizeof(T) == 2, uint16_t, uint32_t>;
    const Bits* s = reinterpret_cast<const Bits*>(src);
    Bits* d = reinterpret_cast<Bits*>(dst);
    for (int idx = tid; idx < ROWS * DP; idx += THREADS) {
      const int r = idx / DP, c = idx % DP;
      d[r * LDS + c] = (r < rows && c < n_cols) ? s[static_cast<int64_t>(r) * ld + c] : Bits(0);
    }
  }
}

// One thread's part of the cp.async copies of successive ROWS x DP tiles of a row-major matrix
// (16-byte rows, THREADS a multiple of the DP / kVec chunks of a row): the same column chunk c of
// rows r0, r0 + kStep, ... of every tile. Its global address is kept as a running pointer,
// advanced one tile per copy, rather than recomputed from the tile index (a 64-bit multiply).
template <typename T, int DP, int LDS, int ROWS, int THREADS>
struct TileStream {
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  static constexpr int kChunks = DP / kVec;
  static constexpr bool kApplies = THREADS % kChunks == 0;
  static constexpr int kStep = kApplies ? THREADS / kChunks : 1;
  const T* next;  // row r0 of the next tile, column c
  const T* base;  // row 0: a valid address for the zero-filling copies
  int64_t ld;
  int r0, dst_offset;
  bool col_valid;

  __device__ __forceinline__ TileStream(const T* src, int64_t ld_, int n_cols, int tid)
      : base(src), ld(ld_), r0(tid / kChunks) {
    const int c = (tid % kChunks) * kVec;
    next = src + (static_cast<int64_t>(r0) * ld + c);
    dst_offset = r0 * LDS + c;
    col_valid = c < n_cols;
  }
  // Copies the next tile, of which `rows` rows are real (the others become zeros), into dst.
  __device__ __forceinline__ void copy_next(T* dst, int rows) {
#pragma unroll
    for (int r = 0; r < ROWS; r += kStep) {
      if (ROWS % kStep != 0 && r0 + r >= ROWS) break;
      const bool valid = col_valid && r0 + r < rows;
      cp_async_16_or_zero(dst + dst_offset + r * LDS, valid ? next + r * ld : base, valid);
    }
    next += ROWS * ld;
  }
};

// Centre (row, col) in [0, 1]^2 of token n of an (h, w) row-major grid, with the same float
// arithmetic as grid_centres() in csrc/attention.cpp (correctly rounded division despite fast math).
__device__ __forceinline__ float2 grid_centre(int n, int h, int w) {
  return make_float2(__fdiv_rn(static_cast<float>(n / w) + 0.5f, static_cast<float>(h)),
                     __fdiv_rn(static_cast<float>(n % w) + 0.5f, static_cast<float>(w)));
}

// Per-row query data for the statistics.
struct RowQuery {
  float x, y;  // grid centre
  int label;
};

// Per-key side data of a key tile, fetched into registers while the tile before it is computed
// and stored into its ring stage at the end of that tile (mask variants only).
struct KeySide {
  uint32_t keep;  // ~0u: an unmasked key of [0, Nk); 0u: masked or padding
  float x, y;     // grid centre (distance)
  int label;      // (label mass)
};

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// kMinShiftedLogit (row_state.h) in log2 units: the clamp of the entropy sum's z, so that a key of
// weight 0 (z = -inf) adds 0 * kMinShiftedLogit2 = 0 rather than 0 * (-inf).
constexpr float kMinShiftedLogit2 = kMinShiftedLogit * kLog2e;

// 2^x with subnormal results flushed to 0 (one MUFU.EX2): 2^x for x < -126, i.e. e^z for z below
// kExpUnderflow, is exactly 0, as row_state.h asks of every kernel; 2^-inf = 0, 2^NaN = NaN.
__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// x where keep is ~0u, exactly -inf where it is 0u: one bit select (LOP3), whatever x holds, so a
// masked key's NaN or inf score never reaches the row max or sum.
__device__ __forceinline__ float keep_or_neg_inf(float x, uint32_t keep) {
  return __uint_as_float((__float_as_uint(x) & keep) | (0xff800000u & ~keep));
}

// S = Q K^T for one warp's 16 query rows against a key tile of 8 NT keys, both in shared memory
// (row stride LDS): s[n][2 ri + e] = row (g + 8 ri), key (8 n + 2 t + e). q_s points at the warp's
// first query row; d is the real head dim (fp32 skips the 4-column steps past it, which only meet
// zero padding).
template <typename T, int DP, int LDS, int NT>
__device__ __forceinline__ void warp_scores(float (&s)[NT][4], const T* q_s, const T* k_s, int d, int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[n][e] = 0.f;
  if constexpr (std::is_same_v<T, float>) {
    const float* qa = q_s + g * LDS;
    const float* qb = qa + 8 * LDS;
    const int d_steps4 = (d + 3) / 4;
#pragma unroll 4
    for (int d4 = 0; d4 < d_steps4; ++d4) {
      const float4 a = *reinterpret_cast<const float4*>(qa + 4 * d4);
      const float4 c = *reinterpret_cast<const float4*>(qb + 4 * d4);
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float4 kv = *reinterpret_cast<const float4*>(k_s + (8 * n + 2 * t + e) * LDS + 4 * d4);
          s[n][e] = fmaf(a.x, kv.x, fmaf(a.y, kv.y, fmaf(a.z, kv.z, fmaf(a.w, kv.w, s[n][e]))));
          s[n][2 + e] = fmaf(c.x, kv.x, fmaf(c.y, kv.y, fmaf(c.z, kv.z, fmaf(c.w, kv.w, s[n][2 + e]))));
        }
    }
  } else {
    // every k-step of the bucket, also past d: those columns of Q and K are zero in shared memory
    // (load_tile), so they add exact zeros, and the loop has no branch (FlashAttention-2 pads alike)
#pragma unroll
    for (int kk = 0; kk < DP / 16; ++kk) {
      uint32_t a[4];
      ldmatrix_x4(a, q_s + (lane & 15) * LDS + kk * 16 + (lane >> 4) * 8);
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        uint32_t kb[4];
        ldmatrix_x4(kb, k_s + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * LDS + kk * 16 + ((lane >> 3) & 1) * 8);
        mma_16816<T>(s[2 * np], a, kb[0], kb[1]);
        mma_16816<T>(s[2 * np + 1], a, kb[2], kb[3]);
      }
    }
  }
}

}  // namespace detail

// What a variant compiles in (Variant, attention_params.h).
template <Variant V>
struct VariantTraits {
  static constexpr bool kFull = V == Variant::kFull;
  static constexpr bool kEntropy = V == Variant::kEntropy || kFull;  // kFull: when p.want_entropy
  static constexpr bool kMask = V == Variant::kMasked || kFull;       // per-key keep words in shared memory
};

template <typename T, int DP, Variant V>
__global__ void __launch_bounds__(TileConfig<T, DP>::kThreads, TileConfig<T, DP>::kMinBlocksPerSm)
    attention_fwd_kernel(const AttentionParams p) {
  using namespace detail;
  using Cfg = TileConfig<T, DP>;
  using Var = VariantTraits<V>;
  constexpr int BM = Cfg::kBlockM, BN = Cfg::kBlockN, LDS = Cfg::kLds, THREADS = Cfg::kThreads;
  constexpr int WN = Cfg::kWarpsN;
  constexpr int NT = BN / 8;    // 8-key column tiles of S per warp
  constexpr int DVW = DP / WN;  // output columns per warp
  constexpr int NO = DVW / 8;   // 8-column tiles of O per warp
  constexpr int kBytes = static_cast<int>(sizeof(T));
  static_assert(BN <= THREADS, "one thread per key fetches a tile's side data");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* const sQ = reinterpret_cast<T*>(smem_raw);  // [BM][LDS]
  T* const sK = sQ + BM * LDS;                   // [stage][BN][LDS]
  T* const sV = sK + Cfg::kStages * BN * LDS;    // [stage][BN][LDS]
  uint32_t* const sKeep = reinterpret_cast<uint32_t*>(sV + Cfg::kStages * BN * LDS);  // [stage][BN] KeySide::keep
  float* const sKx = reinterpret_cast<float*>(sKeep + Cfg::kStages * BN);            // [stage][BN] key grid centre
  float* const sKy = sKx + Cfg::kStages * BN;
  int* const sKl = reinterpret_cast<int*>(sKy + Cfg::kStages * BN);  // [stage][BN] key label

  const int n_qtiles = (p.Nq + BM - 1) / BM;
  const int qt = static_cast<int>(blockIdx.x % n_qtiles);  // query tiles of one head are neighbours: K/V stay in L2
  const int bh = static_cast<int>(blockIdx.x / n_qtiles);
  const int b = bh / p.H, h = bh % p.H;
  const int q0 = qt * BM;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / WN, wn = warp % WN;
  const int g = lane >> 2, t = lane & 3;

  // The lean variants are launched with 16-byte rows, scale > 0 and no distance or label mass only
  // (select_variant); kFull reads every choice from p.
  const bool q_vec = !Var::kFull || p.q_vec, k_vec = !Var::kFull || p.k_vec, v_vec = !Var::kFull || p.v_vec;
  const bool want_entropy = Var::kEntropy && (!Var::kFull || p.want_entropy);
  const bool want_distance = Var::kFull && p.want_distance;
  const bool want_label_mass = Var::kFull && p.want_label_mass;
  // The lean variants keep raw scores s (the max of s times scale > 0 is the max of the logits) and
  // take p = 2^{s scale log2(e) - m log2(e)}, one FFMA and one EX2 per score; kFull scales each
  // score first, rounded as the CPU kernel's s * scale (so that any scale, and an overflow to +inf,
  // behave as there), and takes p = 2^{x log2(e) - m log2(e)}.
  const float to_logit = Var::kFull ? 1.f : p.scale;  // score -> logit
  const float to_log2 = to_logit * kLog2e;              // score -> logit in log2 units

  const T* const qp = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
  const T* const kp = static_cast<const T*>(p.k) + b * p.k_stride[0] + h * p.k_stride[1];
  const T* const vp = static_cast<const T*>(p.v) + b * p.v_stride[0] + h * p.v_stride[1];
  const int n_ktiles = (p.Nk + BN - 1) / BN;

  // K and V rows of key tile `tile` into ring stage `stage` (cp.async, zero-filled past Nk). Tiles
  // are loaded in order, 0, 1, ...: the lean variants stream them through running pointers.
  using Stream = TileStream<T, DP, LDS, BN, THREADS>;
  constexpr bool kStreamed = !Var::kFull && Stream::kApplies;
  Stream k_stream(kp, p.k_stride[2], p.D, tid), v_stream(vp, p.v_stride[2], p.Dv, tid);
  auto load_kv = [&](int tile, int stage) {
    const int j0 = tile * BN;
    if constexpr (kStreamed) {
      k_stream.copy_next(sK + stage * BN * LDS, p.Nk - j0);
      v_stream.copy_next(sV + stage * BN * LDS, p.Nk - j0);
    } else {
      load_tile<T, DP, LDS, BN, THREADS>(sK + stage * BN * LDS, kp + j0 * p.k_stride[2], p.k_stride[2], p.Nk - j0,
                                         p.D, k_vec, tid);
      load_tile<T, DP, LDS, BN, THREADS>(sV + stage * BN * LDS, vp + j0 * p.v_stride[2], p.v_stride[2], p.Nk - j0,
                                         p.Dv, v_vec, tid);
    }
  };
  // Side data of key tile * BN + tid (threads tid < BN): plain global loads into registers, which
  // the tile's maths covers before store_side needs them.
  auto fetch_side = [&](int tile) {
    KeySide ks{0u, 0.f, 0.f, 0};
    const int j = tile * BN + tid;
    if (tid < BN && j < p.Nk) {
      ks.keep = (!p.key_mask || p.key_mask[b * p.mask_stride[0] + j * p.mask_stride[1]] != 0) ? ~0u : 0u;
      if (want_distance) {
        const float2 c = grid_centre(j, p.grid_hk, p.grid_wk);
        ks.x = c.x;
        ks.y = c.y;
      }
      if (want_label_mass) ks.label = p.k_label[b * p.k_label_stride[0] + j * p.k_label_stride[1]];
    }
    return ks;
  };
  auto store_side = [&](const KeySide& ks, int stage) {
    if (tid < BN) {
      sKeep[stage * BN + tid] = ks.keep;
      if (want_distance) {
        sKx[stage * BN + tid] = ks.x;
        sKy[stage * BN + tid] = ks.y;
      }
      if (want_label_mass) sKl[stage * BN + tid] = ks.label;
    }
  };

  // Prologue: Q tile and key tile 0 form the first copy group; tile 0's side data goes straight
  // to stage 0 (the loop's first barrier publishes it).
  load_tile<T, DP, LDS, BM, THREADS>(sQ, qp + q0 * p.q_stride[2], p.q_stride[2], p.Nq - q0, p.D, q_vec, tid);
  if (n_ktiles > 0) {
    load_kv(0, 0);
    if constexpr (Var::kMask) store_side(fetch_side(0), 0);
  }
  cp_async_commit();

  // Rows g and g + 8 of this warp's 16.
  const int row_base = q0 + wm * 16 + g;
  RowState st[2] = {row_state_init(), row_state_init()};
  RowQuery rq[2] = {{0.f, 0.f, 0}, {0.f, 0.f, 0}};
  if constexpr (Var::kFull) {
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) {
      const int i = row_base + 8 * ri;
      const bool valid = i < p.Nq;
      const float2 c = (want_distance && valid) ? grid_centre(i, p.grid_hq, p.grid_wq) : make_float2(0.f, 0.f);
      rq[ri].x = c.x;
      rq[ri].y = c.y;
      rq[ri].label = (want_label_mass && valid) ? p.q_label[b * p.q_label_stride[0] + i * p.q_label_stride[1]] : 0;
    }
  }
  float o[NO][4];
#pragma unroll
  for (int n = 0; n < NO; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[n][e] = 0.f;

  const int col0 = wn * DVW;  // first output column of this warp
  // This lane's ldmatrix addresses (bytes, stage 0, k-step 0) into the warp's Q rows (lane l: row
  // l % 16, columns 8 (l / 16) + ...), K (row l % 8 + 8 (l / 16), columns 8 ((l / 8) % 2) + ...) and
  // V (row l % 16, columns col0 + 8 (l / 16) + ...), as warp_scores and the PV loop below form them.
  [[maybe_unused]] const uint32_t q_lane = opaque(smem_u32(sQ + (wm * 16 + (lane & 15)) * LDS + (lane >> 4) * 8));
  [[maybe_unused]] const uint32_t k_lane =
      opaque(smem_u32(sK + ((lane & 7) + ((lane >> 4) << 3)) * LDS + ((lane >> 3) & 1) * 8));
  [[maybe_unused]] const uint32_t v_lane = opaque(smem_u32(sV + (lane & 15) * LDS + col0 + (lane >> 4) * 8));

  // One key tile. `checked` (a compile-time bool) masks keys that are not part of the row: with a
  // key mask every tile, without one only the last tile when BN does not divide Nk; the other,
  // full tiles run the loop below with no per-score test at all.
  auto key_tile = [&](const int it, auto checked) {
    const int stage = it & 1;
    const bool more = it + 1 < n_ktiles;
    [[maybe_unused]] KeySide next{0u, 0.f, 0.f, 0};
    if constexpr (Var::kMask)
      if (more) next = fetch_side(it + 1);
    if (more) load_kv(it + 1, stage ^ 1);  // that stage was released by the barrier ending it - 1
    cp_async_commit();
    cp_async_wait<1>();  // this thread's copies of tile `it` (and Q) have landed
    __syncthreads();     // ... and everyone else's, and tile `it`'s side data

    [[maybe_unused]] const T* const k_s = sK + stage * BN * LDS;  // (fp32; the tensor-core path reads k_lane)
    [[maybe_unused]] const T* const v_s = sV + stage * BN * LDS;

    // ---- S = Q K^T: s[n][2 ri + e] = row (g + 8 ri), key (8 n + 2 t + e) of this tile
    float s[NT][4];
    if constexpr (Cfg::kF32) {
      warp_scores<T, DP, LDS, NT>(s, sQ + wm * 16 * LDS, k_s, p.D, lane);
    } else {
      // warp_scores' tensor-core loop, from the lane addresses computed before the loop plus
      // immediate offsets (bytes): k-step kk, 16-key pair np, ring stage
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[n][e] = 0.f;
      const uint32_t k_addr = k_lane + stage * (BN * LDS * kBytes);
#pragma unroll
      for (int kk = 0; kk < DP / 16; ++kk) {
        uint32_t a[4];
        ldmatrix_x4_at(a, q_lane + kk * 16 * kBytes);
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
          uint32_t kb[4];
          ldmatrix_x4_at(kb, k_addr + np * (16 * LDS * kBytes) + kk * 16 * kBytes);
          mma_16816<T>(s[2 * np], a, kb[0], kb[1]);
          mma_16816<T>(s[2 * np + 1], a, kb[2], kb[3]);
        }
      }
    }

    // ---- keys that are not part of the row get score -inf (weight 0, never poison): masked keys
    // and padding past Nk through their keep words, or, without a mask, the padding of the last
    // tile only; a full unmasked tile takes no per-score test.
    if constexpr (Var::kFull) {
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[n][e] = __fmul_rn(s[n][e], p.scale);
    }
    if constexpr (Var::kMask) {
      static_assert(decltype(checked)::value, "a key mask checks every tile");
      const uint32_t* const keep = sKeep + stage * BN;
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        const uint2 kw = *reinterpret_cast<const uint2*>(keep + 8 * n + 2 * t);
#pragma unroll
        for (int ri = 0; ri < 2; ++ri) {
          s[n][2 * ri] = keep_or_neg_inf(s[n][2 * ri], kw.x);
          s[n][2 * ri + 1] = keep_or_neg_inf(s[n][2 * ri + 1], kw.y);
        }
      }
    } else if constexpr (decltype(checked)::value) {
      const int kv_valid = p.Nk - it * BN;  // < BN: the last tile, padded past Nk
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (8 * n + 2 * t + (e & 1) >= kv_valid) s[n][e] = -INFINITY;
    }

    // ---- online softmax and statistics; s becomes p = e^{logit - m}
    float alpha[2];
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) {
      // fmaxf skips NaN: a NaN score leaves the max alone, and its p, NaN, makes the sum NaN below
      float mb = -INFINITY;
#pragma unroll
      for (int n = 0; n < NT; ++n) mb = fmaxf(mb, fmaxf(s[n][2 * ri], s[n][2 * ri + 1]));
      mb = fmaxf(mb, __shfl_xor_sync(kFullMask, mb, 1));
      mb = fmaxf(mb, __shfl_xor_sync(kFullMask, mb, 2));
      // The tile's max logit. +inf can only come from poison: a +inf logit of an attended key (a
      // +inf score, or a finite one whose logit overflows, which happens exactly when the max's does).
      const float m_tile = mb * to_logit;
      const float m_new = fmaxf(st[ri].m, m_tile);
      // safe max: while every key so far had weight 0, m_new = -inf and p = 2^{-inf - 0} = 0. (A
      // finite max logit beyond FLT_MAX / log2(e), 2.4e38, would overflow here: such rows are not
      // computed as the CPU kernel does.)
      const float m_log2 = (m_new == -INFINITY ? 0.f : m_new) * kLog2e;

      float sum_p = 0.f, sum_pz = 0.f, sum_pd = 0.f, sum_pl = 0.f;
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int jj = 8 * n + 2 * t + e;
          const float z = fmaf(s[n][2 * ri + e], to_log2, -m_log2);  // logit - m, log2 units
          const float pv = exp2_ftz(z);
          sum_p += pv;
          if (want_entropy) sum_pz = fmaf(pv, fmaxf(z, kMinShiftedLogit2), sum_pz);
          if (want_distance) {
            const float dx = sKx[stage * BN + jj] - rq[ri].x, dy = sKy[stage * BN + jj] - rq[ri].y;
            sum_pd = fmaf(pv, __fsqrt_rn(fmaf(dx, dx, dy * dy)), sum_pd);
          }
          if (want_label_mass && sKl[stage * BN + jj] == rq[ri].label) sum_pl += pv;
          s[n][2 * ri + e] = pv;
        }
      // the quad's partial sums; the butterfly leaves bit-identical totals in all four lanes
      sum_p += __shfl_xor_sync(kFullMask, sum_p, 1);
      sum_p += __shfl_xor_sync(kFullMask, sum_p, 2);
      if (want_entropy) {
        sum_pz += __shfl_xor_sync(kFullMask, sum_pz, 1);
        sum_pz += __shfl_xor_sync(kFullMask, sum_pz, 2);
      }
      if (want_distance) {
        sum_pd += __shfl_xor_sync(kFullMask, sum_pd, 1);
        sum_pd += __shfl_xor_sync(kFullMask, sum_pd, 2);
      }
      if (want_label_mass) {
        sum_pl += __shfl_xor_sync(kFullMask, sum_pl, 1);
        sum_pl += __shfl_xor_sync(kFullMask, sum_pl, 2);
      }
      // Poison from the tile's results, not per score: a +inf max, or a NaN sum (a NaN logit of an
      // attended key; weight-0 keys give p = 0 exactly and a clean row's p are finite). A poisoned
      // state stays NaN through later rescales and adds (csrc/row_state.h), and its NaN 1 / l makes
      // out NaN in the epilogue whatever head_scale, the replacement and O (then garbage) are.
      const bool poisoned = m_tile == INFINITY || sum_p != sum_p;
      alpha[ri] = row_state_rescale(st[ri], m_new);
      if (poisoned) row_state_poison(st[ri]);
      else row_state_add(st[ri], sum_p, sum_pz * kLn2, sum_pd, sum_pl);
    }

    // ---- O = alpha O + P V
#pragma unroll
    for (int n = 0; n < NO; ++n) {
      o[n][0] *= alpha[0];
      o[n][1] *= alpha[0];
      o[n][2] *= alpha[1];
      o[n][3] *= alpha[1];
    }
    if constexpr (Cfg::kF32) {
      // p of key jj sits in lane 4 g + (jj % 8) / 2 of the quad; V row jj is read from shared memory
#pragma unroll
      for (int jj = 0; jj < BN; ++jj) {
        const int src = (lane & ~3) | ((jj & 7) >> 1);
        const float pa = __shfl_sync(kFullMask, s[jj / 8][jj & 1], src);
        const float pb = __shfl_sync(kFullMask, s[jj / 8][2 + (jj & 1)], src);
        const float* vrow = v_s + jj * LDS + col0 + 2 * t;
#pragma unroll
        for (int n = 0; n < NO; ++n) {
          if (col0 + 8 * n < p.Dv) {
            const float2 vv = *reinterpret_cast<const float2*>(vrow + 8 * n);
            o[n][0] = fmaf(pa, vv.x, o[n][0]);
            o[n][1] = fmaf(pa, vv.y, o[n][1]);
            o[n][2] = fmaf(pb, vv.x, o[n][2]);
            o[n][3] = fmaf(pb, vv.y, o[n][3]);
          }
        }
      }
    } else {
#pragma unroll
      for (int kc = 0; kc < BN / 16; ++kc) {
        // the accumulators of two neighbouring 8-key tiles are exactly the A operand of a k16 step
        const uint32_t a[4] = {pack2<T>(s[2 * kc][0], s[2 * kc][1]), pack2<T>(s[2 * kc][2], s[2 * kc][3]),
                               pack2<T>(s[2 * kc + 1][0], s[2 * kc + 1][1]),
                               pack2<T>(s[2 * kc + 1][2], s[2 * kc + 1][3])};
#pragma unroll
        for (int dp = 0; dp < NO / 2; ++dp) {  // all columns: V's past Dv are zero, and never stored
          uint32_t vb[4];
          ldmatrix_x4_trans_at(vb, v_lane + stage * (BN * LDS * kBytes) + kc * (16 * LDS * kBytes) + dp * 16 * kBytes);
          mma_16816<T>(o[2 * dp], a, vb[0], vb[1]);
          mma_16816<T>(o[2 * dp + 1], a, vb[2], vb[3]);
        }
      }
    }
    // tile it + 1's side data into the other stage, which no one reads during this tile (its last
    // reader, tile it - 1, ended at the barrier before this tile); the barrier below publishes it
    if constexpr (Var::kMask)
      if (more) store_side(next, stage ^ 1);
    __syncthreads();  // everyone is done with this stage before it is refilled
  };
  using Checked = std::true_type;
  using Unchecked = std::false_type;
  if constexpr (Var::kMask) {
    for (int it = 0; it < n_ktiles; ++it) key_tile(it, Checked{});
  } else {
    const int n_full = p.Nk / BN;  // tiles of BN real keys
    for (int it = 0; it < n_full; ++it) key_tile(it, Unchecked{});
    if (n_full < n_ktiles) key_tile(n_full, Checked{});
  }
  cp_async_wait<0>();

  // ---- epilogue: out = hs * O / l + (1 - hs) * replacement, and the statistics
  const float hs = p.head_scale ? p.head_scale[b * p.head_scale_stride[0] + h * p.head_scale_stride[1]] : 1.f;
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
    const int i = row_base + 8 * ri;
    if (i >= p.Nq) continue;
    const RowStats rs = row_state_finalize(st[ri]);
    if (wn == 0 && t == 0) {
      const int64_t si = static_cast<int64_t>(bh) * p.Nq + i;
      p.lse[si] = rs.lse;
      // (the flags, known at compile time in the lean variants, let the compiler drop the
      // accumulators of statistics a variant does not compute from the main loop)
      if (want_entropy) p.entropy[si] = rs.entropy;
      if (want_distance) p.distance[si] = rs.distance;
      if (want_label_mass) p.label_mass[si] = rs.label_mass;
    }
    T* const dst = static_cast<T*>(p.out) + b * p.out_stride[0] + h * p.out_stride[1] + i * p.out_stride[2];
    const float* const rep = p.replacement ? p.replacement + b * p.replacement_stride[0] +
                                                 h * p.replacement_stride[1] + i * p.replacement_stride[2]
                                           : nullptr;
    const float f = hs * rs.inv_l;
#pragma unroll
    for (int n = 0; n < NO; ++n) {
      const int c = col0 + 8 * n + 2 * t;
      if (c >= p.Dv) continue;
      float y0, y1;
      if (rep) {
        y0 = hs * (o[n][2 * ri] * rs.inv_l) + (1.f - hs) * rep[c * p.replacement_stride[3]];
        y1 = c + 1 < p.Dv ? hs * (o[n][2 * ri + 1] * rs.inv_l) + (1.f - hs) * rep[(c + 1) * p.replacement_stride[3]]
                          : 0.f;
      } else {
        y0 = o[n][2 * ri] * f;
        y1 = o[n][2 * ri + 1] * f;
      }
      if (c + 1 < p.Dv && p.out_pairs) {
        store_pair<T>(dst + c * p.out_stride[3], y0, y1);
      } else {
        dst[c * p.out_stride[3]] = from_float<T>(y0);
        if (c + 1 < p.Dv) dst[(c + 1) * p.out_stride[3]] = from_float<T>(y1);
      }
    }
  }
}

// Second pass for key-group mass (see the top of this file): adds p = e^{scale s - lse} of every
// grouped, unmasked key to key_group_mass[b, h, i, group] (or [b, 0, i, group], summed over heads),
// which the caller zeroed. Reads the lse the forward kernel wrote (same stream, so it has
// finished). A fully masked row (lse = -inf) keeps 0; a
// poisoned row (lse NaN) becomes NaN in every group, as on the CPU. Masked keys, keys past Nk and ids
// outside [0, n_groups) are never touched, so neither their logits (garbage in padding) nor their ids
// can reach the output.
template <typename T, int DP>
__global__ void __launch_bounds__(GroupMassConfig<T, DP>::kThreads, GroupMassConfig<T, DP>::kMinBlocksPerSm)
    key_group_mass_kernel(const AttentionParams p) {
  using namespace detail;
  using Cfg = GroupMassConfig<T, DP>;
  constexpr int BM = Cfg::kBlockM, BN = Cfg::kBlockN, LDS = Cfg::kLds, THREADS = Cfg::kThreads;
  constexpr int NT = BN / 8;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* const sQ = reinterpret_cast<T*>(smem_raw);                // [BM][LDS]
  T* const sK = sQ + BM * LDS;                                 // [BN][LDS]
  int* const sGroup = reinterpret_cast<int*>(sK + BN * LDS);  // [BN] group of each key of the tile, or -1

  const int n_qtiles = (p.Nq + BM - 1) / BM;
  const int qt = static_cast<int>(blockIdx.x % n_qtiles);
  const int bh = static_cast<int>(blockIdx.x / n_qtiles);
  const int b = bh / p.H, h = bh % p.H;
  const int q0 = qt * BM;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int G = p.n_groups;

  const T* const qp = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
  const T* const kp = static_cast<const T*>(p.k) + b * p.k_stride[0] + h * p.k_stride[1];
  load_tile<T, DP, LDS, BM, THREADS>(sQ, qp + q0 * p.q_stride[2], p.q_stride[2], p.Nq - q0, p.D, p.q_vec, tid);
  cp_async_commit();

  // Rows g and g + 8 of this warp's 16: their final lse and their G sums.
  const int row_base = q0 + warp * 16 + g;
  float lse[2];
  float* mass[2];
  bool live[2];
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
    const int i = row_base + 8 * ri;
    const bool valid = i < p.Nq;
    lse[ri] = valid ? p.lse[static_cast<int64_t>(bh) * p.Nq + i] : -INFINITY;
    const int64_t mass_row = static_cast<int64_t>(p.group_heads_summed ? b : bh) * p.Nq + (valid ? i : 0);
    mass[ri] = p.key_group_mass + mass_row * G;
    live[ri] = valid && fabsf(lse[ri]) < INFINITY;   // false for -inf (fully masked) and NaN (poisoned)
    if (valid && lse[ri] != lse[ri])                  // the quad's four lanes share the row's writes
      for (int c = t; c < G; c += 4) mass[ri][c] = NAN;
  }

  const int n_ktiles = (p.Nk + BN - 1) / BN;
  for (int it = 0; it < n_ktiles; ++it) {
    const int j0 = it * BN;
    bool any = false;
    for (int jj = tid; jj < BN; jj += THREADS) {
      const int j = j0 + jj;
      int grp = -1;
      if (j < p.Nk && (!p.key_mask || p.key_mask[b * p.mask_stride[0] + j * p.mask_stride[1]] != 0)) {
        const int id = p.key_groups[b * p.key_groups_stride[0] + j * p.key_groups_stride[1]];
        grp = (id >= 0 && id < G) ? id : -1;
      }
      sGroup[jj] = grp;
      any |= grp >= 0;
    }
    if (!__syncthreads_or(any)) continue;  // no grouped key in this tile (the same answer in every thread)

    load_tile<T, DP, LDS, BN, THREADS>(sK, kp + j0 * p.k_stride[2], p.k_stride[2], p.Nk - j0, p.D, p.k_vec, tid);
    cp_async_commit();
    cp_async_wait<0>();  // this thread's copies of K (and, the first time, of Q) have landed
    __syncthreads();     // ... and everyone else's

    float s[NT][4];
    warp_scores<T, DP, LDS, NT>(s, sQ + warp * 16 * LDS, sK, p.D, lane);
#pragma unroll
    for (int ri = 0; ri < 2; ++ri)
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int grp = sGroup[8 * n + 2 * t + e];
          if (live[ri] && grp >= 0) {
            // the forward's logit (an unfused multiply), relative to the final lse: z <= 0 up to rounding
            const float z = __fmul_rn(s[n][2 * ri + e], p.scale) - lse[ri];
            if (z > kExpUnderflow) atomicAdd(mass[ri] + grp, __expf(z));  // result unused: compiles to RED
          }
        }
    __syncthreads();  // everyone is done with sK and sGroup before the next tile refills them
  }
  cp_async_wait<0>();  // a block that met no grouped key still has its Q copy in flight
}

// Raises `kernel`'s dynamic shared-memory limit to `bytes` (and asks for the largest shared-memory
// carveout, so that two blocks fit where their registers allow) once per device: function
// attributes are per device, and setting them costs a driver call. `done` is the kernel's own set
// of configured devices (devices past 63 are configured on every launch).
template <typename Kernel>
cudaError_t configure_once(Kernel kernel, int bytes, int device, std::atomic<uint64_t>& done) {
  const uint64_t bit = device < 64 ? uint64_t{1} << device : 0;
  if (bit && (done.load(std::memory_order_acquire) & bit)) return cudaSuccess;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess)
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
  if (err == cudaSuccess) done.fetch_or(bit, std::memory_order_release);  // racing first calls both set it: harmless
  return err;
}

template <typename T, int DP, Variant V>
cudaError_t launch_attention(const AttentionParams& p, cudaStream_t stream, int device) {
  using Cfg = TileConfig<T, DP>;
  auto kernel = attention_fwd_kernel<T, DP, V>;
  static std::atomic<uint64_t> configured{0};
  cudaError_t err = configure_once(kernel, Cfg::kSmemBytes, device, configured);
  if (err != cudaSuccess) return err;
  const int64_t blocks = static_cast<int64_t>((p.Nq + Cfg::kBlockM - 1) / Cfg::kBlockM) * p.B * p.H;
  kernel<<<static_cast<unsigned>(blocks), Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess || p.key_group_mass == nullptr) return err;

  using GCfg = GroupMassConfig<T, DP>;
  auto group_kernel = key_group_mass_kernel<T, DP>;
  static std::atomic<uint64_t> group_configured{0};  // one per (T, DP, V), each setting the same kernel: harmless
  err = configure_once(group_kernel, GCfg::kSmemBytes, device, group_configured);
  if (err != cudaSuccess) return err;
  const int64_t group_blocks = static_cast<int64_t>((p.Nq + GCfg::kBlockM - 1) / GCfg::kBlockM) * p.B * p.H;
  group_kernel<<<static_cast<unsigned>(group_blocks), GCfg::kThreads, GCfg::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

#define DIFFCIRC_INSTANTIATE_ATTENTION_VARIANT(T, DP, V) \
  template cudaError_t launch_attention<T, DP, V>(const AttentionParams&, cudaStream_t, int);
#define DIFFCIRC_INSTANTIATE_ATTENTION_BUCKET(DP)                                \
  DIFFCIRC_FOR_EACH_VARIANT(DIFFCIRC_INSTANTIATE_ATTENTION_VARIANT, float, DP)  \
  DIFFCIRC_FOR_EACH_VARIANT(DIFFCIRC_INSTANTIATE_ATTENTION_VARIANT, __half, DP) \
  DIFFCIRC_FOR_EACH_VARIANT(DIFFCIRC_INSTANTIATE_ATTENTION_VARIANT, __nv_bfloat16, DP)

}  // namespace diffcirc::cuda
