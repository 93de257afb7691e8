// CPU kernel of the fused attention op.
//
// One task = one (batch, head, block of query rows). A task streams over key blocks:
//   S = scale * Q K^T          (BLAS GEMM straight from the strided inputs, float32 out)
//   P = e^{S - m}, row stats   (row kernels, AVX-512 / AVX2 / scalar, chosen at run time)
//   O = alpha * O + P V        (BLAS GEMM)
// so per thread only a (rows x keys) tile of logits exists, never the Nq x Nk matrix.
// Tasks run in parallel through at::parallel_for (OpenMP).
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../attention.h"
#include "../row_state.h"
#include "blas.h"
#include "row_kernels.h"

namespace diffcirc {
namespace cpu {
namespace {

constexpr int64_t kQueryBlock = 128;  // rows per task
constexpr int64_t kKeyBlock = 512;    // keys per tile: a 128 x 512 float tile is 256 KiB, L2-sized

Isa detect_isa() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

Isa parse_isa(const std::string& name) {
  if (name == "avx512") return Isa::kAvx512;
  if (name == "avx2") return Isa::kAvx2;
  if (name == "scalar") return Isa::kScalar;
  TORCH_CHECK_VALUE(false, "CPU ISA must be one of avx512, avx2, scalar; got '", name, "'");
}

const char* isa_label(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

// The best the CPU supports, capped by DIFFCIRC_CPU_ISA when set.
Isa& active_isa() {
  static Isa isa = [] {
    Isa best = detect_isa();
    if (const char* env = std::getenv("DIFFCIRC_CPU_ISA")) {
      const Isa wanted = parse_isa(env);
      if (static_cast<int>(wanted) < static_cast<int>(best)) best = wanted;
    }
    return best;
  }();
  return isa;
}

ProcessBlockFn row_kernel() {
  switch (active_isa()) {
    case Isa::kAvx512: return process_block_avx512;
    case Isa::kAvx2: return process_block_avx2;
    default: return process_block_scalar;
  }
}

// Copies a (rows, cols) block with row stride ld into a dense float32 buffer.
template <typename T>
void widen(const T* src, int64_t ld, int64_t rows, int64_t cols, float* dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[r * cols + c] = static_cast<float>(src[r * ld + c]);
}

// Read-only per-call inputs shared by all tasks.
struct Problem {
  int64_t B, H, Nq, Nk, D, Dv;
  float scale;
  int64_t q_stride[3], k_stride[3], v_stride[3];  // strides of dims 0..2 (the last dim is contiguous)
  const float* key_bias;     // (B, Nk) 0 / -inf, or nullptr
  const float* q_row;        // (Nq) grid centres, or nullptr
  const float* q_col;
  const float* k_row;        // (Nk)
  const float* k_col;
  const int32_t* q_label;    // (B, Nq), or nullptr
  const int32_t* k_label;    // (B, Nk)
  const float* head_scale;   // (B, H) with strides hs_stride, or nullptr
  int64_t hs_stride[2];
  const float* replacement;  // (B, H, Nq, Dv) with strides rep_stride, or nullptr
  int64_t rep_stride[4];
  bool entropy;
  // outputs
  void* out;                 // (B, Nq, H, Dv) contiguous
  float* lse;                // (B, H, Nq)
  float* ent;                // (B, H, Nq) or nullptr
  float* dist;
  float* lab;
};

// How a dtype reaches the GEMMs: float32 directly, bfloat16 through the native bf16 GEMM, or
// (float16, or bfloat16 without it) widened to float32 one block at a time.
template <typename T>
struct Path {
  static bool native() {
    if constexpr (std::is_same_v<T, float>) return true;
    else if constexpr (std::is_same_v<T, c10::BFloat16>) return has_native_bf16_gemm();
    else return false;
  }
};

template <typename T>
void run(const Problem& pb, const T* q, const T* k, const T* v) {
  const int64_t n_qblocks = (pb.Nq + kQueryBlock - 1) / kQueryBlock;
  const int64_t n_tasks = pb.B * pb.H * n_qblocks;
  const int64_t kb_max = std::min<int64_t>(kKeyBlock, std::max<int64_t>(pb.Nk, 1));
  const bool native = Path<T>::native();
  const bool bf16_p = native && std::is_same_v<T, c10::BFloat16>;
  const ProcessBlockFn process = row_kernel();

  at::parallel_for(0, n_tasks, 1, [&](int64_t begin, int64_t end) {
    // Per-thread tiles, reused across this thread's tasks.
    std::vector<float> s_tile(kQueryBlock * kb_max), o_acc(kQueryBlock * pb.Dv), alpha(kQueryBlock);
    std::vector<c10::BFloat16> p_bf16(bf16_p ? kQueryBlock * kb_max : 0);
    std::vector<float> qw(native ? 0 : kQueryBlock * pb.D), kw(native ? 0 : kb_max * pb.D),
        vw(native ? 0 : kb_max * pb.Dv);
    std::vector<RowState> state(kQueryBlock);

    for (int64_t task = begin; task < end; ++task) {
      const int64_t qblock = task % n_qblocks, bh = task / n_qblocks, h = bh % pb.H, b = bh / pb.H;
      const int64_t i0 = qblock * kQueryBlock, rows = std::min(kQueryBlock, pb.Nq - i0);
      const T* qp = q + b * pb.q_stride[0] + h * pb.q_stride[1] + i0 * pb.q_stride[2];
      const T* kp = k + b * pb.k_stride[0] + h * pb.k_stride[1];
      const T* vp = v + b * pb.v_stride[0] + h * pb.v_stride[1];
      if (!native) widen(qp, pb.q_stride[2], rows, pb.D, qw.data());

      std::fill(state.begin(), state.begin() + rows, row_state_init());
      std::fill(o_acc.begin(), o_acc.begin() + rows * pb.Dv, 0.f);

      for (int64_t j0 = 0; j0 < pb.Nk; j0 += kKeyBlock) {
        const int64_t cols = std::min(kKeyBlock, pb.Nk - j0);
        const T* kj = kp + j0 * pb.k_stride[2];
        const T* vj = vp + j0 * pb.v_stride[2];
        if constexpr (std::is_same_v<T, float>) {
          gemm_f32(false, true, rows, cols, pb.D, pb.scale, qp, pb.q_stride[2], kj, pb.k_stride[2], 0.f,
                   s_tile.data(), kb_max);
        } else if (native) {
          gemm_bf16(false, true, rows, cols, pb.D, pb.scale, reinterpret_cast<const c10::BFloat16*>(qp),
                    pb.q_stride[2], reinterpret_cast<const c10::BFloat16*>(kj), pb.k_stride[2], 0.f, s_tile.data(),
                    kb_max);
        } else {
          widen(kj, pb.k_stride[2], cols, pb.D, kw.data());
          gemm_f32(false, true, rows, cols, pb.D, pb.scale, qw.data(), pb.D, kw.data(), pb.D, 0.f, s_tile.data(),
                   kb_max);
        }

        BlockArgs a{};
        a.s = s_tile.data();
        a.ld_s = kb_max;
        a.p = bf16_p ? static_cast<void*>(p_bf16.data()) : static_cast<void*>(s_tile.data());
        a.ld_p = kb_max;
        a.p_bf16 = bf16_p;
        a.rows = rows;
        a.cols = cols;
        a.key_bias = pb.key_bias ? pb.key_bias + b * pb.Nk + j0 : nullptr;
        if (pb.k_row) {
          a.kx = pb.k_row + j0;
          a.ky = pb.k_col + j0;
          a.qx = pb.q_row + i0;
          a.qy = pb.q_col + i0;
        }
        if (pb.k_label) {
          a.k_label = pb.k_label + b * pb.Nk + j0;
          a.q_label = pb.q_label + b * pb.Nq + i0;
        }
        a.entropy = pb.entropy;
        a.state = state.data();
        a.alpha = alpha.data();
        process(a);

        for (int64_t r = 0; r < rows; ++r) {
          if (alpha[r] == 1.f) continue;
          float* o = o_acc.data() + r * pb.Dv;
          for (int64_t c = 0; c < pb.Dv; ++c) o[c] *= alpha[r];
        }
        if constexpr (std::is_same_v<T, float>) {
          gemm_f32(false, false, rows, pb.Dv, cols, 1.f, s_tile.data(), kb_max, vj, pb.v_stride[2], 1.f,
                   o_acc.data(), pb.Dv);
        } else if (native) {
          gemm_bf16(false, false, rows, pb.Dv, cols, 1.f, p_bf16.data(), kb_max,
                    reinterpret_cast<const c10::BFloat16*>(vj), pb.v_stride[2], 1.f, o_acc.data(), pb.Dv);
        } else {
          widen(vj, pb.v_stride[2], cols, pb.Dv, vw.data());
          gemm_f32(false, false, rows, pb.Dv, cols, 1.f, s_tile.data(), kb_max, vw.data(), pb.Dv, 1.f,
                   o_acc.data(), pb.Dv);
        }
      }

      // Epilogue: normalise, apply the head intervention, write out and the statistics.
      const float hs = pb.head_scale ? pb.head_scale[b * pb.hs_stride[0] + h * pb.hs_stride[1]] : 1.f;
      T* out = static_cast<T*>(pb.out);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = i0 + r;
        const RowStats rs = row_state_finalize(state[r]);
        const int64_t stat_index = (b * pb.H + h) * pb.Nq + i;
        pb.lse[stat_index] = rs.lse;
        if (pb.ent) pb.ent[stat_index] = rs.entropy;
        if (pb.dist) pb.dist[stat_index] = rs.distance;
        if (pb.lab) pb.lab[stat_index] = rs.label_mass;
        const float* o = o_acc.data() + r * pb.Dv;
        T* dst = out + ((b * pb.Nq + i) * pb.H + h) * pb.Dv;
        if (pb.replacement) {
          const float* rep = pb.replacement + b * pb.rep_stride[0] + h * pb.rep_stride[1] + i * pb.rep_stride[2];
          for (int64_t c = 0; c < pb.Dv; ++c)
            dst[c] = static_cast<T>(hs * (o[c] * rs.inv_l) + (1.f - hs) * rep[c * pb.rep_stride[3]]);
        } else {
          const float f = hs * rs.inv_l;
          for (int64_t c = 0; c < pb.Dv; ++c) dst[c] = static_cast<T>(o[c] * f);
        }
      }
    }
  });
}

// BLAS takes 32-bit leading dimensions no smaller than the row length: other layouts (e.g. a
// key broadcast along N with stride 0) are copied once.
at::Tensor gemm_compatible(const at::Tensor& t) {
  const int64_t ld = t.stride(2);
  return (ld >= t.size(3) && ld <= INT32_MAX) ? t : t.contiguous();
}

}  // namespace

std::string isa_name() { return isa_label(active_isa()); }

std::string set_isa(const std::string& name) {
  const Isa wanted = parse_isa(name);
  TORCH_CHECK_VALUE(static_cast<int>(wanted) <= static_cast<int>(detect_isa()), "this CPU does not support ", name);
  active_isa() = wanted;
  return isa_name();
}

}  // namespace cpu

AttentionResult attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, double scale,
                              const std::optional<at::Tensor>& key_padding_mask,
                              const std::optional<at::Tensor>& head_scale,
                              const std::optional<at::Tensor>& head_replacement, at::IntArrayRef grid,
                              const std::optional<at::Tensor>& q_labels, const std::optional<at::Tensor>& k_labels,
                              bool want_entropy, bool want_distance, bool want_label_mass) {
  check_attention_inputs(q_in, k_in, v_in, key_padding_mask, head_scale, head_replacement, grid, q_labels, k_labels,
                         want_distance, want_label_mass);
  auto result = allocate_attention_outputs(q_in, v_in, want_entropy, want_distance, want_label_mass);
  auto& [out, lse, ent, dist, lab] = result;
  const auto q = cpu::gemm_compatible(q_in), k = cpu::gemm_compatible(k_in), v = cpu::gemm_compatible(v_in);

  cpu::Problem pb{};
  pb.B = q.size(0);
  pb.H = q.size(1);
  pb.Nq = q.size(2);
  pb.D = q.size(3);
  pb.Nk = k.size(2);
  pb.Dv = v.size(3);
  pb.scale = static_cast<float>(scale);
  for (int d = 0; d < 3; ++d) {
    pb.q_stride[d] = q.stride(d);
    pb.k_stride[d] = k.stride(d);
    pb.v_stride[d] = v.stride(d);
  }
  if (out.numel() == 0 && lse.numel() == 0) return result;

  // Small per-call side inputs (O(B * N), never O(Nq * Nk)), kept alive until the kernel ends.
  at::Tensor key_bias, q_row, q_col, k_row, k_col, ql, kl, hs, rep;
  if (key_padding_mask) {
    key_bias = at::where(key_padding_mask->contiguous(), 0.f, -std::numeric_limits<float>::infinity())
                   .to(at::kFloat)
                   .contiguous();
    pb.key_bias = key_bias.data_ptr<float>();
  }
  if (want_distance) {
    auto opts = q.options().dtype(at::kFloat);
    std::tie(q_row, q_col) = grid_centres(grid[0], grid[1], opts);
    std::tie(k_row, k_col) = grid_centres(grid[2], grid[3], opts);
    pb.q_row = q_row.data_ptr<float>();
    pb.q_col = q_col.data_ptr<float>();
    pb.k_row = k_row.data_ptr<float>();
    pb.k_col = k_col.data_ptr<float>();
  }
  if (want_label_mass) {
    ql = q_labels->contiguous();
    kl = k_labels->contiguous();
    pb.q_label = ql.data_ptr<int32_t>();
    pb.k_label = kl.data_ptr<int32_t>();
  }
  if (head_scale) {
    hs = *head_scale;
    pb.head_scale = hs.data_ptr<float>();
    pb.hs_stride[0] = hs.stride(0);
    pb.hs_stride[1] = hs.stride(1);
  }
  if (head_replacement) {
    rep = *head_replacement;
    pb.replacement = rep.data_ptr<float>();
    for (int d = 0; d < 4; ++d) pb.rep_stride[d] = rep.stride(d);
  }
  pb.entropy = want_entropy;
  pb.out = out.data_ptr();
  pb.lse = lse.data_ptr<float>();
  pb.ent = want_entropy ? ent.data_ptr<float>() : nullptr;
  pb.dist = want_distance ? dist.data_ptr<float>() : nullptr;
  pb.lab = want_label_mass ? lab.data_ptr<float>() : nullptr;

  switch (q.scalar_type()) {
    case at::kFloat:
      cpu::run<float>(pb, q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>());
      break;
    case at::kBFloat16:
      cpu::run<c10::BFloat16>(pb, q.data_ptr<c10::BFloat16>(), k.data_ptr<c10::BFloat16>(),
                              v.data_ptr<c10::BFloat16>());
      break;
    default:
      cpu::run<c10::Half>(pb, q.data_ptr<c10::Half>(), k.data_ptr<c10::Half>(), v.data_ptr<c10::Half>());
  }
  return result;
}

}  // namespace diffcirc
