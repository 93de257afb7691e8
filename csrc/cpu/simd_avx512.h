// AVX-512 traits V of the row kernels (row_block_impl.h, row_fast_avx512.h), shared by the AVX-512
// variants (row_kernels_avx512.cpp, row_kernels_avx512bf16.cpp). The includer defines DC_TARGET
// (the target attribute of its instruction set) first, and DC_NATIVE_BF16 where the CPU has
// AVX512-BF16: float32 -> bfloat16 packing is then one VCVTNEPS2BF16 instead of five integer ops.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "../row_state.h"
#include "vec_exp.h"

namespace {

namespace vec_exp = diffcirc::cpu::vec_exp;

struct V {
  static constexpr int W = 16;
  using reg = __m512;
  DC_TARGET static reg zero() { return _mm512_setzero_ps(); }
  DC_TARGET static reg set1(float x) { return _mm512_set1_ps(x); }
  DC_TARGET static reg load(const float* p) { return _mm512_loadu_ps(p); }
  DC_TARGET static void store(float* p, reg x) { _mm512_storeu_ps(p, x); }
  DC_TARGET static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  DC_TARGET static reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  DC_TARGET static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  // b when either is NaN (MAXPS returns its second operand): row_block_impl.h relies on this
  DC_TARGET static reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
  DC_TARGET static reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  DC_TARGET static reg sqrt(reg a) { return _mm512_sqrt_ps(a); }
  DC_TARGET static float hsum(reg a) { return _mm512_reduce_add_ps(a); }
  // lanes holding NaN or +inf, accumulated (a -inf logit is an ordinary zero-weight key)
  using lanes = __mmask16;
  DC_TARGET static lanes no_lanes() { return 0; }
  DC_TARGET static lanes or_poison(lanes acc, reg x) {
    return acc | _mm512_cmp_ps_mask(x, _mm512_set1_ps(INFINITY), _CMP_NLT_UQ);
  }
  // the same, counting only unmasked keys (bias b > -inf): a masked key never poisons its row
  DC_TARGET static lanes or_poison_unmasked(lanes acc, reg x, reg b) {
    const __mmask16 unmasked = _mm512_cmp_ps_mask(b, _mm512_set1_ps(-INFINITY), _CMP_GT_OQ);
    return acc | _mm512_mask_cmp_ps_mask(unmasked, x, _mm512_set1_ps(INFINITY), _CMP_NLT_UQ);
  }
  DC_TARGET static bool any(lanes acc) { return acc != 0; }
  DC_TARGET static float hmax(reg a) { return _mm512_reduce_max_ps(a); }
  // p where label == ql, else 0
  DC_TARGET static reg select_eq(const int32_t* labels, int32_t ql, reg p) {
    const __mmask16 eq = _mm512_cmpeq_epi32_mask(_mm512_loadu_si512(labels), _mm512_set1_epi32(ql));
    return _mm512_maskz_mov_ps(eq, p);
  }
  // e^x for x <= 0 (the approximation and its constants: vec_exp.h), 2^n applied by scalef;
  // x below kExpUnderflow (-87.34, where float32 leaves the normal range) gives exactly 0.
  DC_TARGET static reg exp(reg x) {
    const reg lo = _mm512_set1_ps(diffcirc::kExpUnderflow);
    const __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ);
    x = _mm512_max_ps(x, lo);
    const reg n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(vec_exp::kLog2e)),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    reg r = _mm512_fnmadd_ps(n, _mm512_set1_ps(vec_exp::kLn2Hi), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(vec_exp::kLn2Lo), r);
    reg y = _mm512_set1_ps(vec_exp::kPoly[0]);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(vec_exp::kPoly[1]));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(vec_exp::kPoly[2]));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(vec_exp::kPoly[3]));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(vec_exp::kPoly[4]));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(vec_exp::kPoly[5]));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(y, n));
  }
  // 16 bfloat16, rounded to nearest even (x finite, or NaN with DC_NATIVE_BF16)
  DC_TARGET static __m256i to_bf16(reg x) {
#ifdef DC_NATIVE_BF16
    return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x));
#else
    __m512i u = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    return _mm512_cvtepi32_epi16(u);
#endif
  }
  DC_TARGET static void store_bf16(uint16_t* dst, reg x) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), to_bf16(x));
  }
};

}  // namespace
