// CPU kernel of the fused attention op.
//
// One task = one (batch, head, block of query rows). A task streams over key blocks:
//   S = scale * Q K^T          (BLAS GEMM straight from the strided inputs, float32 out)
//   P = e^{S - m}, row stats   (row kernels, AVX-512 / AVX2 / scalar, chosen at run time; on AVX-512
//                               one pass per row against the max of earlier blocks, row_fast_avx512.h)
//   O = alpha * O + P V        (BLAS GEMM)
// so per thread only a (rows x keys) tile of logits exists, never the Nq x Nk matrix.
// Tasks run in parallel through at::parallel_for (OpenMP).
//
// Key-group mass keeps G running sums per row, one more accumulator family of the online softmax
// (row_state.h). They live in the task's own rows of the (B, H, Nq, G) output itself (no scratch,
// memory O(B H Nq G)). They are kept relative to a reference max of their own, not rescaled each
// time a row's max moves: a block without grouped keys (Flux's image keys after its text keys)
// never touches them, and one with grouped keys adds its p times e^{m - m_ref}, rescaling only when
// the max has grown by more than kGroupMassRescaleGap since (rescaling on every move, the plain
// online softmax, cost up to 40% on Flux's layer at G = 512; the final e^{m_ref - m} rides on the
// 1 / l multiply). Each block's p goes in group by group through runs of consecutive keys
// (GroupRun, built once per call): a prompt whose tokens are each a group, or whose words span
// several tokens, costs a few vector adds per row and block rather than one scattered add per key.
#include <algorithm>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <new>
#include <vector>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "../attention.h"
#include "../row_state.h"
#include "blas.h"
#include "isa.h"
#include "row_kernels.h"

namespace diffcirc::cpu {
namespace {

constexpr int64_t kQueryBlock = 128;  // rows per task
constexpr int64_t kKeyBlock = 512;    // keys per tile: a 128 x 512 float tile is 256 KiB, L2-sized

// Row stride (elements) of a tile or packed block holding `cols` columns: an odd multiple of 32,
// so that rows of float32 (and bfloat16 pairs) start on 64-byte lines and the 16 or 32 rows an AMX
// tile or a vector loop touches at once fall into as many L1 sets. At 512 float32 columns (2 KiB
// apart) the Q K^T product's 16-row tiles fell into two sets and ran 5x slower than the P V product
// of the same size; bfloat16 rows that straddle lines cost oneDNN's AMX loads up to 2x.
constexpr int64_t padded_row(int64_t cols) {
  const int64_t lines = (cols + 31) / 32;
  return 32 * (lines | 1);
}

// Tiles and packed blocks start on 64-byte lines (see padded_row).
template <typename T>
struct LineAligned {
  using value_type = T;
  LineAligned() = default;
  template <typename U>
  LineAligned(const LineAligned<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{64})); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t{64}); }
  template <typename U>
  bool operator==(const LineAligned<U>&) const { return true; }
};
template <typename T>
using Buffer = std::vector<T, LineAligned<T>>;

// Copies a (rows, cols) block with row stride ld into a dense float32 buffer.
template <typename T>
void widen(const T* src, int64_t ld, int64_t rows, int64_t cols, float* dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[r * cols + c] = static_cast<float>(src[r * ld + c]);
}

// x rounded to bfloat16 (nearest even; NaN stays NaN) as c10::BFloat16 rounds it, without its
// branch: the bits of a vector of them.
inline uint16_t bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7FFFFFFFu) > 0x7F800000u ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
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
  int64_t n_groups;          // key groups, 0 without key-group mass
  const GroupRun* runs;      // grouped keys of key block jb of batch b: runs[run_begin[b * n_kblocks + jb] ..
  const int64_t* run_begin;  //   run_begin[b * n_kblocks + jb + 1])
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
  float* group_mass;         // (B, H, Nq, n_groups), (B, 1, Nq, n_groups) zeroed when summed, or nullptr
  // Summed over heads: each task accumulates its rows in its tile, then adds them into group_mass
  // holding the lock of its (batch, query block) (tasks of different heads share those rows).
  bool group_heads_summed;
  std::mutex* group_locks;   // kGroupLocks of them, or nullptr
};

constexpr int64_t kGroupLocks = 64;

constexpr int64_t key_blocks(int64_t nk) { return (nk + kKeyBlock - 1) / kKeyBlock; }

// The runs of grouped keys (row_kernels.h) of every (batch, key block), in that order, and where each
// (batch, key block)'s runs begin: key_groups (B, Nk) int32 contiguous; ids outside [0, n_groups) are
// in no group. O(B * Nk) work and memory.
void build_group_runs(const int32_t* key_groups, int64_t B, int64_t Nk, int64_t n_groups, std::vector<GroupRun>& runs,
                      std::vector<int64_t>& run_begin) {
  const int64_t n_kblocks = key_blocks(Nk);
  runs.clear();
  run_begin.assign(B * n_kblocks + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t jb = 0; jb < n_kblocks; ++jb) {
      run_begin[b * n_kblocks + jb] = static_cast<int64_t>(runs.size());
      const int64_t j0 = jb * kKeyBlock, cols = std::min(kKeyBlock, Nk - j0);
      const int32_t* g = key_groups + b * Nk + j0;
      const size_t first = runs.size();
      for (int32_t j = 0; j < cols; ++j) {
        if (g[j] < 0 || g[j] >= n_groups) continue;
        if (runs.size() > first) {
          GroupRun& last = runs.back();
          const bool adjacent = last.col + last.len == j;
          if (adjacent && last.len == 1 && (g[j] == last.group || g[j] == last.group + 1)) {
            last.step = g[j] - last.group;
            last.len = 2;
            continue;
          }
          if (adjacent && last.len > 1 && g[j] == last.group + last.step * last.len) {
            ++last.len;
            continue;
          }
        }
        runs.push_back(GroupRun{j, g[j], 1, 1});
      }
    }
  }
  run_begin[B * n_kblocks] = static_cast<int64_t>(runs.size());
}

// How a dtype reaches the GEMMs: float32 through sgemm; bfloat16 (even head dim) through the
// bf16 micro-kernel on K and V packed once per (batch, head); anything else widened to float32
// one block at a time.
enum class GemmPath { kF32, kBf16Packed, kWiden };

template <typename T>
GemmPath gemm_path(const Problem& pb) {
  if constexpr (std::is_same_v<T, float>) return GemmPath::kF32;
  if constexpr (std::is_same_v<T, c10::BFloat16>)
    if (pb.D % 2 == 0 && has_brgemm_bf16()) return GemmPath::kBf16Packed;
  return GemmPath::kWiden;
}

constexpr int64_t kPackBudgetBytes = int64_t{32} << 20;  // packed K and V of one chunk of (batch, head)

// Packed K^T and V of (batch, head) pairs [bh0, bh0 + count), key block by key block.
struct PackedKV {
  int64_t bh0 = 0, n_kblocks = 0, k_block_elems = 0, v_block_elems = 0;
  int64_t k_ldb = 0, v_ldb = 0;  // pairs per row of a packed K^T / V block (padded_row)
  Buffer<c10::BFloat16> k, v;
  const c10::BFloat16* k_block(int64_t bh, int64_t jb) const {
    return k.data() + ((bh - bh0) * n_kblocks + jb) * k_block_elems;
  }
  const c10::BFloat16* v_block(int64_t bh, int64_t jb) const {
    return v.data() + ((bh - bh0) * n_kblocks + jb) * v_block_elems;
  }
};

void pack_chunk(const Problem& pb, const c10::BFloat16* k, const c10::BFloat16* v, int64_t bh0, int64_t count,
                PackedKV& packed) {
  packed.bh0 = bh0;
  packed.n_kblocks = (pb.Nk + kKeyBlock - 1) / kKeyBlock;
  packed.k_ldb = padded_row(kKeyBlock);
  packed.k_block_elems = packed.k_ldb * pb.D;
  packed.v_ldb = padded_row(pb.Dv);
  packed.v_block_elems = kKeyBlock * packed.v_ldb;  // kKeyBlock is even: room for an odd block's zero row
  packed.k.resize(count * packed.n_kblocks * packed.k_block_elems);
  packed.v.resize(count * packed.n_kblocks * packed.v_block_elems);
  at::parallel_for(0, count * packed.n_kblocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t jb = item % packed.n_kblocks, bh = bh0 + item / packed.n_kblocks;
      const int64_t b = bh / pb.H, h = bh % pb.H, j0 = jb * kKeyBlock, cols = std::min(kKeyBlock, pb.Nk - j0);
      const c10::BFloat16* kj = k + b * pb.k_stride[0] + h * pb.k_stride[1] + j0 * pb.k_stride[2];
      const c10::BFloat16* vj = v + b * pb.v_stride[0] + h * pb.v_stride[1] + j0 * pb.v_stride[2];
      pack_vnni_transposed(kj, pb.k_stride[2], cols, pb.D, const_cast<c10::BFloat16*>(packed.k_block(bh, jb)),
                           packed.k_ldb);
      pack_vnni(vj, pb.v_stride[2], cols, pb.Dv, const_cast<c10::BFloat16*>(packed.v_block(bh, jb)), packed.v_ldb);
    }
  });
}

// Per-thread tiles, reused across the thread's tasks and calls.
struct Tiles {
  int64_t ld = 0;    // row stride of the score / probability tiles (padded_row: even, as the bf16 packing needs)
  int64_t ld_o = 0;  // row stride of the output accumulator (padded_row)
  Buffer<float> s, o;
  std::vector<float> alpha;
  // p, kept apart from s: the fast row path (row_fast_avx512.h) may redo a row from its logits
  Buffer<float> p_f32;
  Buffer<c10::BFloat16> p_bf16;
  Buffer<float> qw, kw, vw;  // widened blocks (GemmPath::kWiden)
  std::vector<RowState> state;
  std::vector<float> group_ref;  // key-group accumulators' reference max per row (row_state.h)
  std::vector<float> group_acc;  // (kQueryBlock, n_groups) accumulators when summed over heads
  // Sizes the tiles for a call. Their contents are not reset: every task writes what it reads.
  void reset(const Problem& pb, GemmPath path, int64_t kb_max) {
    ld = padded_row(kb_max);
    ld_o = padded_row(pb.Dv);
    s.resize(kQueryBlock * ld);
    o.resize(kQueryBlock * ld_o);
    alpha.resize(kQueryBlock);
    state.resize(kQueryBlock);
    if (pb.group_mass) group_ref.resize(kQueryBlock);
    if (pb.group_heads_summed) group_acc.resize(kQueryBlock * pb.n_groups);
    if (path == GemmPath::kBf16Packed) p_bf16.resize(kQueryBlock * ld);
    else p_f32.resize(kQueryBlock * ld);
    if (path == GemmPath::kWiden) {
      qw.resize(kQueryBlock * pb.D);
      kw.resize(kb_max * pb.D);
      vw.resize(kb_max * pb.Dv);
    }
  }
};

// The key-group accumulators of rows [i0, i0 + rows) of head (b, h): the output's rows, or the
// task's tile when summed over heads.
float* group_accumulators(const Problem& pb, int64_t b, int64_t h, int64_t i0, Tiles& t) {
  if (!pb.group_mass) return nullptr;
  return pb.group_heads_summed ? t.group_acc.data() : pb.group_mass + ((b * pb.H + h) * pb.Nq + i0) * pb.n_groups;
}

// Writes out, lse and the statistics of rows [i0, i0 + rows) of head (b, h).
template <typename T>
void finish_rows(const Problem& pb, int64_t b, int64_t h, int64_t i0, int64_t rows, Tiles& t) {
  float* group_acc = group_accumulators(pb, b, h, i0, t);
  const float hs = pb.head_scale ? pb.head_scale[b * pb.hs_stride[0] + h * pb.hs_stride[1]] : 1.f;
  T* out = static_cast<T*>(pb.out);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r;
    const RowStats rs = row_state_finalize(t.state[r]);
    const int64_t stat_index = (b * pb.H + h) * pb.Nq + i;
    pb.lse[stat_index] = rs.lse;
    if (pb.ent) pb.ent[stat_index] = rs.entropy;
    if (pb.dist) pb.dist[stat_index] = rs.distance;
    if (pb.lab) pb.lab[stat_index] = rs.label_mass;
    if (group_acc) {
      float* acc = group_acc + r * pb.n_groups;
      const float f = group_mass_factor(t.group_ref[r], t.state[r], rs);
      for (int64_t g = 0; g < pb.n_groups; ++g) acc[g] *= f;
    }
    const float* o = t.o.data() + r * t.ld_o;
    T* dst = out + ((b * pb.Nq + i) * pb.H + h) * pb.Dv;
    if (pb.replacement) {
      const float* rep = pb.replacement + b * pb.rep_stride[0] + h * pb.rep_stride[1] + i * pb.rep_stride[2];
      for (int64_t c = 0; c < pb.Dv; ++c)
        dst[c] = static_cast<T>(hs * (o[c] * rs.inv_l) + (1.f - hs) * rep[c * pb.rep_stride[3]]);
    } else {
      const float f = hs * rs.inv_l;
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        for (int64_t c = 0; c < pb.Dv; ++c) dst[c].x = bf16_bits(o[c] * f);  // a loop the compiler vectorises
      } else {
        for (int64_t c = 0; c < pb.Dv; ++c) dst[c] = static_cast<T>(o[c] * f);
      }
    }
  }
  if (pb.group_heads_summed) {
    const int64_t block = b * ((pb.Nq + kQueryBlock - 1) / kQueryBlock) + i0 / kQueryBlock;
    std::lock_guard<std::mutex> lock(pb.group_locks[block % kGroupLocks]);
    float* dst = pb.group_mass + (b * pb.Nq + i0) * pb.n_groups;
    for (int64_t e = 0; e < rows * pb.n_groups; ++e) dst[e] += group_acc[e];
  }
}

// One task: rows [i0, i0 + rows) of head (b, h), streamed over every key block.
template <typename T>
void run_task(const Problem& pb, GemmPath path, const T* q, const T* k, const T* v, const PackedKV& packed,
              int64_t b, int64_t h, int64_t i0, int64_t rows, Tiles& t, ProcessBlockFn process) {
  const T* qp = q + b * pb.q_stride[0] + h * pb.q_stride[1] + i0 * pb.q_stride[2];
  const T* kp = k + b * pb.k_stride[0] + h * pb.k_stride[1];
  const T* vp = v + b * pb.v_stride[0] + h * pb.v_stride[1];
  if (path == GemmPath::kWiden) widen(qp, pb.q_stride[2], rows, pb.D, t.qw.data());
  std::fill(t.state.begin(), t.state.begin() + rows, row_state_init());
  std::fill(t.o.begin(), t.o.begin() + rows * t.ld_o, 0.f);
  float* group_mass = group_accumulators(pb, b, h, i0, t);
  if (group_mass) {
    std::fill(group_mass, group_mass + rows * pb.n_groups, 0.f);
    std::fill(t.group_ref.begin(), t.group_ref.begin() + rows, -std::numeric_limits<float>::infinity());
  }

  for (int64_t j0 = 0, jb = 0; j0 < pb.Nk; j0 += kKeyBlock, ++jb) {
    const int64_t cols = std::min(kKeyBlock, pb.Nk - j0);
    const T* kj = kp + j0 * pb.k_stride[2];
    const T* vj = vp + j0 * pb.v_stride[2];

    // S = Q K^T (unscaled; the row kernel applies the scale)
    if (path == GemmPath::kBf16Packed) {
      brgemm_bf16_vnni(rows, cols, pb.D, reinterpret_cast<const c10::BFloat16*>(qp), pb.q_stride[2],
                       packed.k_block(b * pb.H + h, jb), packed.k_ldb, t.s.data(), t.ld, false);
    } else if (path == GemmPath::kF32) {
      gemm_f32(false, true, rows, cols, pb.D, 1.f, reinterpret_cast<const float*>(qp), pb.q_stride[2],
               reinterpret_cast<const float*>(kj), pb.k_stride[2], 0.f, t.s.data(), t.ld);
    } else {
      widen(kj, pb.k_stride[2], cols, pb.D, t.kw.data());
      gemm_f32(false, true, rows, cols, pb.D, 1.f, t.qw.data(), pb.D, t.kw.data(), pb.D, 0.f, t.s.data(), t.ld);
    }

    BlockArgs a{};
    a.s = t.s.data();
    a.ld_s = t.ld;
    a.scale = pb.scale;
    a.p_bf16 = path == GemmPath::kBf16Packed;
    a.p = a.p_bf16 ? static_cast<void*>(t.p_bf16.data()) : static_cast<void*>(t.p_f32.data());
    a.ld_p = t.ld;
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
    if (group_mass) {
      const int64_t* begin = pb.run_begin + b * key_blocks(pb.Nk) + jb;
      a.group_mass = group_mass;
      a.n_groups = pb.n_groups;
      a.group_ref = t.group_ref.data();
      a.runs = pb.runs + begin[0];
      a.n_runs = begin[1] - begin[0];
    }
    a.state = t.state.data();
    a.alpha = t.alpha.data();
    process(a);

    for (int64_t r = 0; r < rows; ++r) {
      if (t.alpha[r] == 1.f) continue;  // (0 also when e^{m_old - m_new} underflows: the row must go to 0)
      float* o = t.o.data() + r * t.ld_o;
      for (int64_t c = 0; c < pb.Dv; ++c) o[c] *= t.alpha[r];
    }

    // O += P V
    if (path == GemmPath::kBf16Packed) {
      const int64_t cols_even = cols + (cols & 1);
      if (cols & 1)  // the packed V pairs an odd last key with a zero row: give it a zero column
        for (int64_t r = 0; r < rows; ++r) t.p_bf16[r * t.ld + cols] = c10::BFloat16(0.f);
      brgemm_bf16_vnni(rows, pb.Dv, cols_even, t.p_bf16.data(), t.ld, packed.v_block(b * pb.H + h, jb),
                       packed.v_ldb, t.o.data(), t.ld_o, true);
    } else if (path == GemmPath::kF32) {
      brgemm_f32(rows, pb.Dv, cols, t.p_f32.data(), t.ld, reinterpret_cast<const float*>(vj), pb.v_stride[2],
                 t.o.data(), t.ld_o, true);
    } else {
      widen(vj, pb.v_stride[2], cols, pb.Dv, t.vw.data());
      gemm_f32(false, false, rows, pb.Dv, cols, 1.f, t.p_f32.data(), t.ld, t.vw.data(), pb.Dv, 1.f, t.o.data(),
               t.ld_o);
    }
  }
  finish_rows<T>(pb, b, h, i0, rows, t);
}

template <typename T>
void run(const Problem& pb, const T* q, const T* k, const T* v) {
  const GemmPath path = gemm_path<T>(pb);
  const int64_t n_qblocks = (pb.Nq + kQueryBlock - 1) / kQueryBlock;
  const int64_t kb_max = std::min<int64_t>(kKeyBlock, std::max<int64_t>(pb.Nk, 1));
  const ProcessBlockFn process = process_block_for(active_isa());

  // The packed path works through (batch, head) pairs in chunks whose packed K and V fit the
  // budget; the other paths take all pairs at once.
  int64_t chunk = pb.B * pb.H;
  if (path == GemmPath::kBf16Packed) {
    const int64_t block_bytes = (padded_row(kKeyBlock) * pb.D + kKeyBlock * padded_row(pb.Dv)) * 2;  // as pack_chunk
    const int64_t per_bh = key_blocks(pb.Nk) * block_bytes;
    chunk = std::clamp<int64_t>(kPackBudgetBytes / std::max<int64_t>(per_bh, 1), 1, pb.B * pb.H);
  }
  PackedKV packed;
  for (int64_t bh0 = 0; bh0 < pb.B * pb.H; bh0 += chunk) {
    const int64_t count = std::min(chunk, pb.B * pb.H - bh0);
    if (path == GemmPath::kBf16Packed)
      pack_chunk(pb, reinterpret_cast<const c10::BFloat16*>(k), reinterpret_cast<const c10::BFloat16*>(v), bh0,
                 count, packed);
    at::parallel_for(0, count * n_qblocks, 1, [&](int64_t begin, int64_t end) {
      // kept by each thread across calls: fresh tiles cost a page fault per 4 KiB and a zero fill
      // on every call (5% of a 1024-token call)
      thread_local Tiles tiles;
      tiles.reset(pb, path, kb_max);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t bh = bh0 + task / n_qblocks, i0 = (task % n_qblocks) * kQueryBlock;
        run_task<T>(pb, path, q, k, v, packed, bh / pb.H, bh % pb.H, i0, std::min(kQueryBlock, pb.Nq - i0), tiles,
                    process);
      }
      if (path == GemmPath::kBf16Packed) brgemm_release();
    });
  }
}

// BLAS takes 32-bit leading dimensions no smaller than the row length: other layouts (e.g. a
// key broadcast along N with stride 0) are copied once.
at::Tensor gemm_compatible(const at::Tensor& t) {
  const int64_t ld = t.stride(2);
  return (ld >= t.size(3) && ld <= INT32_MAX) ? t : t.contiguous();
}

// The CPU implementation of torch.ops.diffcirc.attention (schema: attention.cpp; arguments and
// outputs: attention.h). q: (B, H, Nq, D), k: (B, H, Nk, D), v: (B, H, Nk, Dv).
AttentionResult attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, double scale,
                              const std::optional<at::Tensor>& key_padding_mask,
                              const std::optional<at::Tensor>& head_scale,
                              const std::optional<at::Tensor>& head_replacement, at::IntArrayRef grid,
                              const std::optional<at::Tensor>& q_labels, const std::optional<at::Tensor>& k_labels,
                              bool want_entropy, bool want_distance, bool want_label_mass,
                              const std::optional<at::Tensor>& key_groups, int64_t n_groups, bool sum_group_heads) {
  check_attention_inputs(q_in, k_in, v_in, key_padding_mask, head_scale, head_replacement, grid, q_labels, k_labels,
                         want_distance, want_label_mass, key_groups, n_groups);
  auto result = allocate_attention_outputs(q_in, v_in, want_entropy, want_distance, want_label_mass, n_groups,
                                           sum_group_heads);
  auto& [out, lse, ent, dist, lab, group_mass] = result;
  if (lse.numel() == 0) return result;  // B, H or Nq is 0
  const auto q = gemm_compatible(q_in), k = gemm_compatible(k_in), v = gemm_compatible(v_in);

  Problem pb{};
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

  // Small per-call side inputs (O(B * N), never O(Nq * Nk)), kept alive until the kernel ends.
  at::Tensor key_bias, q_row, q_col, k_row, k_col, ql, kl, hs, rep;
  std::vector<GroupRun> runs;
  std::vector<int64_t> run_begin;
  std::unique_ptr<std::mutex[]> group_locks;
  if (key_padding_mask) {
    key_bias = at::where(*key_padding_mask, 0.f, -std::numeric_limits<float>::infinity()).to(at::kFloat).contiguous();
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
  if (key_groups) {
    const at::Tensor kg = key_groups->contiguous();
    build_group_runs(kg.data_ptr<int32_t>(), pb.B, pb.Nk, n_groups, runs, run_begin);
    pb.n_groups = n_groups;
    pb.runs = runs.data();
    pb.run_begin = run_begin.data();
    pb.group_mass = group_mass.data_ptr<float>();
    if (sum_group_heads) {
      group_locks = std::make_unique<std::mutex[]>(kGroupLocks);
      pb.group_heads_summed = true;
      pb.group_locks = group_locks.get();
    }
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
      run<float>(pb, q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>());
      break;
    case at::kBFloat16:
      run<c10::BFloat16>(pb, q.data_ptr<c10::BFloat16>(), k.data_ptr<c10::BFloat16>(), v.data_ptr<c10::BFloat16>());
      break;
    default:
      run<c10::Half>(pb, q.data_ptr<c10::Half>(), k.data_ptr<c10::Half>(), v.data_ptr<c10::Half>());
  }
  return result;
}

}  // namespace
}  // namespace diffcirc::cpu

TORCH_LIBRARY_IMPL(diffcirc, CPU, m) { m.impl("attention", &diffcirc::cpu::attention_cpu); }
