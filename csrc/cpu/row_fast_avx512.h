// The AVX-512 row kernels' fast path: one pass over a row's logits instead of two, for tiles
// without masks and key groups (the calls that sweeps, traces and self-attention make), with a
// positive scale; entropy, distance and label mass are summed in the same pass.
//
// The two-pass row (row_block_impl.h) first finds the block max, then computes p = e^{s - m}
// against it. Here a row keeps its reference max m (RowState::m) from the blocks before, as long
// as the block's logits stay within kLazyMaxGap of it: p = e^{s - m} then lies below e^kLazyMaxGap
// (about 3000), far inside float32 and bfloat16's range, and the sums stay exact relative to m. So
// after the first block most rows need neither the max pass nor a rescale of their output row
// (alpha = 1). A block that climbs higher is redone against its own max, which the pass has found
// on the way; the first block of a row, with no reference yet, reads its max first. Each pass:
//   z2 = s * (scale log2 e) - m log2 e           (one FMA: the softmax in base 2)
//   p = 2^z2                                      (degree-5 / -4 polynomial, VSCALEFPS)
// and entropy's sum of p (s - m) is kept in base 2 and multiplied by ln 2 once per row.
//
// NaN and inf logits need no compare per key: a NaN propagates into the sum of p, an unmasked
// +inf into the block max; either sends the row to the two-pass kernel, which poisons it as the
// other paths do. So do a row already poisoned and a first block whose logits are all -inf.
//
// Requires before inclusion: DC_TARGET, simd_avx512.h, row_block_impl.h.

#include <cmath>

#include "vec_exp.h"

namespace {

using vec_exp::kLn2;
using vec_exp::kLog2e;
// A row's reference max is moved only when a block's max exceeds it by more than this (nats).
constexpr float kLazyMaxGap = 8.0f;
// Rows whose reference max is larger in magnitude take the two-pass kernel: m log2 e and the folded
// scale are each rounded once, which shifts z2 by up to |m| 1.7e-7 (0.17 here, the two-pass row's own
// rounding of s * scale is of the same order), and past ~7e8 would zero a block's largest p.
constexpr float kMaxReference = 1e6f;
// kExpUnderflow in base 2 (about -126: e^z below it is exactly 0 on every path; here z is taken from
// the row's reference max, which may trail its true max).
constexpr float kExp2Underflow = diffcirc::kExpUnderflow * kLog2e;

// 2^x for x = clamp_z2(z2), exactly 0 outside keep (the lanes whose z2 is at least kExp2Underflow,
// or NaN), NaN for a NaN x: the polynomial of vec_exp.h times 2^round(x) by VSCALEFPS.
template <int DEGREE>
DC_TARGET inline __m512 exp2_poly(__m512 x, __mmask16 keep) {
  static_assert(DEGREE == 4 || DEGREE == 5);
  const float* poly = DEGREE == 5 ? vec_exp::kExp2Poly5 : vec_exp::kExp2Poly4;
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 y = _mm512_set1_ps(poly[0]);
  for (int i = 1; i <= DEGREE; ++i) y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(poly[i]));
  return _mm512_maskz_scalef_ps(keep, y, n);
}

// z2 with -inf raised to a finite value below kExp2Underflow (NaN stays: MAXPS returns its second operand).
DC_TARGET inline __m512 clamp_z2(__m512 z2) { return _mm512_max_ps(_mm512_set1_ps(kExp2Underflow - 1.f), z2); }

// The lanes of a row's last, partial vector.
DC_TARGET inline __mmask16 tail_lanes(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }

// Largest raw logit of the row (NaN skipped: MAXPS returns its second operand).
DC_TARGET inline float raw_row_max(const float* s, int64_t cols) {
  __m512 vm = _mm512_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j + 16 <= cols; j += 16) vm = _mm512_max_ps(_mm512_loadu_ps(s + j), vm);
  if (j < cols) vm = _mm512_max_ps(_mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), tail_lanes(cols - j), s + j), vm);
  return _mm512_reduce_max_ps(vm);
}

struct PassSums {
  float max_z2;  // largest z2 = (s scale - m) log2 e of the row (NaN skipped)
  float sum_p;   // NaN when a logit was NaN
  float sum_pz2, sum_pd, sum_pl;
};

// What one pass over a row reads besides its logits.
struct PassInputs {
  __m512 c, neg_m2;               // scale log2 e, -m log2 e
  __m512 qx, qy;                  // the query's grid centre (distance)
  __m512i ql;                     // the query's label (label mass)
  const float *kx, *ky;           // the block's key grid centres
  const int32_t* k_label;         // the block's key labels
};

// Accumulators of one pass.
struct PassAcc {
  __m512 p, pz2, pd, pl, max_z2;
};

// Keys j .. j + 15 of a pass (lanes: those of a partial last vector, FULL: all 16).
template <bool ENTROPY, bool DIST, bool LAB, bool P_BF16, bool FULL>
DC_TARGET inline void exp_step(const float* s, int64_t j, __mmask16 lanes, const PassInputs& in, void* p_row,
                               PassAcc& acc) {
  // bfloat16 p keeps 8 bits, degree 4 is 700x finer (l and the statistics, summed from the float32 p,
  // carry its 2.7e-6 relative error: bfloat16 inputs' own is 1000x larger)
  constexpr int kDegree = P_BF16 ? 4 : 5;
  const __m512 x = FULL ? _mm512_loadu_ps(s + j) : _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), lanes, s + j);
  const __m512 z2 = _mm512_fmadd_ps(x, in.c, in.neg_m2);
  acc.max_z2 = _mm512_max_ps(z2, acc.max_z2);
  const __m512 zc = clamp_z2(z2);
  const __mmask16 keep = _mm512_cmp_ps_mask(z2, _mm512_set1_ps(kExp2Underflow), _CMP_NLT_UQ);
  const __m512 p = exp2_poly<kDegree>(zc, keep);  // 0 in a partial vector's missing lanes (logit -inf)
  acc.p = _mm512_add_ps(acc.p, p);
  // the clamped z2: a -inf logit adds p * z2 = 0, not NaN
  if constexpr (ENTROPY) acc.pz2 = _mm512_fmadd_ps(p, zc, acc.pz2);
  if constexpr (DIST) {
    const __m512 kx = FULL ? _mm512_loadu_ps(in.kx + j) : _mm512_maskz_loadu_ps(lanes, in.kx + j);
    const __m512 ky = FULL ? _mm512_loadu_ps(in.ky + j) : _mm512_maskz_loadu_ps(lanes, in.ky + j);
    const __m512 dx = _mm512_sub_ps(kx, in.qx), dy = _mm512_sub_ps(ky, in.qy);
    acc.pd = _mm512_fmadd_ps(p, _mm512_sqrt_ps(_mm512_fmadd_ps(dx, dx, _mm512_mul_ps(dy, dy))), acc.pd);
  }
  if constexpr (LAB) {
    const __m512i kl = FULL ? _mm512_loadu_si512(in.k_label + j) : _mm512_maskz_loadu_epi32(lanes, in.k_label + j);
    acc.pl = _mm512_add_ps(acc.pl, _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(kl, in.ql), p));
  }
  if constexpr (P_BF16) {
    uint16_t* dst = static_cast<uint16_t*>(p_row) + j;
    if constexpr (FULL) V::store_bf16(dst, p);
    else _mm256_mask_storeu_epi16(dst, lanes, V::to_bf16(p));
  } else {
    float* dst = static_cast<float*>(p_row) + j;
    if constexpr (FULL) _mm512_storeu_ps(dst, p);
    else _mm512_mask_storeu_ps(dst, lanes, p);
  }
}

// p = 2^z2 of row r against reference m, stored as float32 or bfloat16, with its sums.
template <bool ENTROPY, bool DIST, bool LAB, bool P_BF16>
DC_TARGET inline PassSums exp_pass(const BlockArgs& a, int64_t r, float m, void* p_row) {
  const float* s = a.s + r * a.ld_s;
  PassInputs in{_mm512_set1_ps(a.scale * kLog2e), _mm512_set1_ps(-m * kLog2e), _mm512_setzero_ps(),
                _mm512_setzero_ps(), _mm512_setzero_si512(), a.kx, a.ky, a.k_label};
  if constexpr (DIST) in.qx = _mm512_set1_ps(a.qx[r]), in.qy = _mm512_set1_ps(a.qy[r]);
  if constexpr (LAB) in.ql = _mm512_set1_epi32(a.q_label[r]);
  const __m512 zero = _mm512_setzero_ps();
  PassAcc acc{zero, zero, zero, zero, _mm512_set1_ps(-INFINITY)};
  int64_t j = 0;
  for (; j + 16 <= a.cols; j += 16) exp_step<ENTROPY, DIST, LAB, P_BF16, true>(s, j, 0xFFFF, in, p_row, acc);
  if (j < a.cols) exp_step<ENTROPY, DIST, LAB, P_BF16, false>(s, j, tail_lanes(a.cols - j), in, p_row, acc);
  return PassSums{_mm512_reduce_max_ps(acc.max_z2), _mm512_reduce_add_ps(acc.p),
                  ENTROPY ? _mm512_reduce_add_ps(acc.pz2) : 0.f, DIST ? _mm512_reduce_add_ps(acc.pd) : 0.f,
                  LAB ? _mm512_reduce_add_ps(acc.pl) : 0.f};
}

// Row r of the tile on the fast path; rows it cannot take go to the two-pass process_row.
template <bool ENTROPY, bool DIST, bool LAB, bool P_BF16>
DC_TARGET void fast_row(const BlockArgs& a, int64_t r) {
  RowState& st = a.state[r];
  void* p_row = P_BF16 ? static_cast<void*>(static_cast<uint16_t*>(a.p) + r * a.ld_p)
                       : static_cast<void*>(static_cast<float*>(a.p) + r * a.ld_p);
  if (st.l != st.l) return process_row<DIST, LAB, false>(a, r);  // poisoned before
  float m = st.m;
  const bool first = !(st.l > 0.f);  // no reference yet
  if (first) m = raw_row_max(a.s + r * a.ld_s, a.cols) * a.scale;  // = max of s * scale: rounding is monotonic
  if (!(std::fabs(m) < kMaxReference)) return process_row<DIST, LAB, false>(a, r);  // +-inf too
  PassSums sums = exp_pass<ENTROPY, DIST, LAB, P_BF16>(a, r, m, p_row);
  if (sums.max_z2 > kLazyMaxGap * kLog2e) {  // the block climbs past the reference: redo against its max
    m += sums.max_z2 * kLn2;
    if (!(std::fabs(m) < kMaxReference)) return process_row<DIST, LAB, false>(a, r);  // a +inf logit too
    sums = exp_pass<ENTROPY, DIST, LAB, P_BF16>(a, r, m, p_row);
  }
  // a NaN logit, a max that moved twice, or a first block whose own max lost its weight to rounding
  if (!(sums.sum_p < INFINITY) || sums.max_z2 > kLazyMaxGap * kLog2e || (first && !(sums.sum_p > 0.f)))
    return process_row<DIST, LAB, false>(a, r);
  a.alpha[r] = m == st.m ? 1.f : diffcirc::row_state_rescale(st, m);
  diffcirc::row_state_add(st, sums.sum_p, ENTROPY ? sums.sum_pz2 * kLn2 : 0.f, sums.sum_pd, sums.sum_pl);
}

// Whether the fast path takes this tile (see the top of this file).
inline bool fast_path_applies(const BlockArgs& a) {
  return a.key_bias == nullptr && a.group_mass == nullptr && a.scale > 0.f && a.scale * kLog2e < INFINITY;
}

template <bool ENTROPY, bool DIST, bool LAB, bool P_BF16>
DC_TARGET void fast_rows(const BlockArgs& a) {
  for (int64_t r = 0; r < a.rows; ++r) fast_row<ENTROPY, DIST, LAB, P_BF16>(a, r);
}

template <bool ENTROPY, bool DIST, bool LAB>
DC_TARGET void fast_rows_for(const BlockArgs& a) {
  if (a.p_bf16) fast_rows<ENTROPY, DIST, LAB, true>(a);
  else fast_rows<ENTROPY, DIST, LAB, false>(a);
}

template <bool ENTROPY>
DC_TARGET void fast_rows_with(const BlockArgs& a) {
  const bool dist = a.kx != nullptr, lab = a.k_label != nullptr;
  if (dist && lab) fast_rows_for<ENTROPY, true, true>(a);
  else if (dist) fast_rows_for<ENTROPY, true, false>(a);
  else if (lab) fast_rows_for<ENTROPY, false, true>(a);
  else fast_rows_for<ENTROPY, false, false>(a);
}

// The AVX-512 variants' process_block: the fast path where it applies, else the two-pass rows.
DC_TARGET void process_block_fast_or_exact(const BlockArgs& a) {
  if (!fast_path_applies(a)) return process_block(a);
  if (a.entropy) fast_rows_with<true>(a);
  else fast_rows_with<false>(a);
}

}  // namespace
