// AVX2 + FMA variant of the per-block row work (8 float lanes), for CPUs without AVX-512.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "row_kernels.h"
#include "vec_exp.h"

#define DC_TARGET __attribute__((target("avx2,fma,f16c")))

namespace {

namespace vec_exp = diffcirc::cpu::vec_exp;

struct V {
  static constexpr int W = 8;
  using reg = __m256;
  DC_TARGET static reg zero() { return _mm256_setzero_ps(); }
  DC_TARGET static reg set1(float x) { return _mm256_set1_ps(x); }
  DC_TARGET static reg load(const float* p) { return _mm256_loadu_ps(p); }
  DC_TARGET static void store(float* p, reg x) { _mm256_storeu_ps(p, x); }
  DC_TARGET static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  DC_TARGET static reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  DC_TARGET static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  // b when either is NaN (MAXPS returns its second operand): row_block_impl.h relies on this
  DC_TARGET static reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
  DC_TARGET static reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  DC_TARGET static reg sqrt(reg a) { return _mm256_sqrt_ps(a); }
  DC_TARGET static float hsum(reg a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }
  // lanes holding NaN or +inf, accumulated (a -inf logit is an ordinary zero-weight key)
  using lanes = __m256;
  DC_TARGET static lanes no_lanes() { return _mm256_setzero_ps(); }
  DC_TARGET static lanes or_poison(lanes acc, reg x) {
    return _mm256_or_ps(acc, _mm256_cmp_ps(x, _mm256_set1_ps(INFINITY), _CMP_NLT_UQ));
  }
  // the same, counting only unmasked keys (bias b > -inf): a masked key never poisons its row
  DC_TARGET static lanes or_poison_unmasked(lanes acc, reg x, reg b) {
    const reg unmasked = _mm256_cmp_ps(b, _mm256_set1_ps(-INFINITY), _CMP_GT_OQ);
    return _mm256_or_ps(acc, _mm256_and_ps(unmasked, _mm256_cmp_ps(x, _mm256_set1_ps(INFINITY), _CMP_NLT_UQ)));
  }
  DC_TARGET static bool any(lanes acc) { return _mm256_movemask_ps(acc) != 0; }
  DC_TARGET static float hmax(reg a) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }
  DC_TARGET static reg select_eq(const int32_t* labels, int32_t ql, reg p) {
    const __m256i eq = _mm256_cmpeq_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(labels)),
                                          _mm256_set1_epi32(ql));
    return _mm256_and_ps(_mm256_castsi256_ps(eq), p);
  }
  // Same approximation as the AVX-512 variant (vec_exp.h); 2^n built in the exponent bits.
  DC_TARGET static reg exp(reg x) {
    const reg lo = _mm256_set1_ps(diffcirc::kExpUnderflow);
    const reg keep = _mm256_cmp_ps(x, lo, _CMP_GE_OQ);
    x = _mm256_max_ps(x, lo);
    const reg n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(vec_exp::kLog2e)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    reg r = _mm256_fnmadd_ps(n, _mm256_set1_ps(vec_exp::kLn2Hi), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(vec_exp::kLn2Lo), r);
    reg y = _mm256_set1_ps(vec_exp::kPoly[0]);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(vec_exp::kPoly[1]));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(vec_exp::kPoly[2]));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(vec_exp::kPoly[3]));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(vec_exp::kPoly[4]));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(vec_exp::kPoly[5]));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(keep, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
  }
  DC_TARGET static void store_bf16(uint16_t* dst, reg x) {
    __m256i u = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(u, u), 0xD8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_castsi256_si128(packed));
  }
};

}  // namespace

#include "row_block_impl.h"

namespace diffcirc::cpu {
void process_block_avx2(const BlockArgs& a) { process_block(a); }
}  // namespace diffcirc::cpu

#else  // not x86-64: never selected at run time
#include "row_kernels.h"
namespace diffcirc::cpu {
void process_block_avx2(const BlockArgs& a) { process_block_scalar(a); }
}  // namespace diffcirc::cpu
#endif
