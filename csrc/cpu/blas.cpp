#include "blas.h"
#include "isa.h"

#include <dlfcn.h>

#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>

namespace diffcirc::cpu {
namespace {

// Fortran sgemm (column-major), as exported by the BLAS inside libtorch_cpu (MKL on x86-64).
using SgemmFn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                         const int*, const float*, const int*, const float*, float*, const int*);

SgemmFn sgemm() {
  static const SgemmFn f = reinterpret_cast<SgemmFn>(dlsym(RTLD_DEFAULT, "sgemm_"));
  return f;
}

// Views a row-major float operand as a (rows, cols) tensor without copying.
at::Tensor view(const float* p, bool trans, int64_t rows, int64_t cols, int64_t ld) {
  auto x = at::from_blob(const_cast<float*>(p), {trans ? cols : rows, trans ? rows : cols}, {ld, 1},
                         at::TensorOptions().dtype(at::kFloat));
  return trans ? x.t() : x;
}

// For torch builds whose BLAS does not export sgemm_.
void gemm_aten(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
               const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  auto A = view(a, ta, m, k, lda);
  auto B = view(b, tb, k, n, ldb);
  auto C = at::from_blob(c, {m, n}, {ldc, 1}, at::TensorOptions().dtype(at::kFloat));
  if (beta == 0.f) C.copy_(at::mm(A, B).mul_(alpha));
  else C.mul_(beta).add_(at::mm(A, B), alpha);
}

}  // namespace

void gemm_f32(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
              const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (auto f = sgemm()) {
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
    const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    const char tA = tb ? 'T' : 'N', tB = ta ? 'T' : 'N';
    f(&tA, &tB, &M, &N, &K, &alpha, b, &la, a, &lb, &beta, c, &lc);
    return;
  }
  gemm_aten(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void brgemm_bf16_vnni(int64_t m, int64_t n, int64_t k, const c10::BFloat16* a, int64_t lda, const c10::BFloat16* b,
                      int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, a, b, c, /*is_vnni=*/true);
}

void brgemm_release() { at::native::cpublas::brgemm_release(/*is_vnni=*/true); }

namespace {
bool probe_brgemm_f32() {
  // [1 2; 3 4] x [5 6; 7 8] = [19 22; 43 50]
  const float a[4] = {1.f, 2.f, 3.f, 4.f}, b[4] = {5.f, 6.f, 7.f, 8.f};
  float c[4] = {0.f, 0.f, 0.f, 0.f};
  try {
    at::native::cpublas::brgemm(2, 2, 2, 2, 2, 2, false, a, b, c, /*is_vnni=*/false);
  } catch (const std::exception&) {
    return false;
  }
  return c[0] == 19.f && c[1] == 22.f && c[2] == 43.f && c[3] == 50.f;
}
}  // namespace

bool has_brgemm_f32() {
  static const bool ok = probe_brgemm_f32();
  return ok;
}

void brgemm_f32(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                int64_t ldc, bool accumulate) {
  if (m == 0 || n == 0) return;
  if (!has_brgemm_f32()) return gemm_f32(false, false, m, n, k, 1.f, a, lda, b, ldb, accumulate ? 1.f : 0.f, c, ldc);
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, a, b, c, /*is_vnni=*/false);
}

bool has_brgemm_bf16() {
  static const bool ok = [] {
    // [1 2; 3 4] x [5 6; 7 8] = [19 22; 43 50], B packed as ((5, 7), (6, 8)).
    const c10::BFloat16 a[4] = {1.f, 2.f, 3.f, 4.f}, b[4] = {5.f, 7.f, 6.f, 8.f};
    float c[4] = {0.f, 0.f, 0.f, 0.f};
    try {
      brgemm_bf16_vnni(2, 2, 2, a, 2, b, 2, c, 2, false);
      brgemm_release();
    } catch (const std::exception&) {
      return false;
    }
    return c[0] == 19.f && c[1] == 22.f && c[2] == 43.f && c[3] == 50.f;
  }();
  return ok;
}

namespace {

// Words [p0, p1) of keys [n0, n1) of pack_vnni_transposed, one at a time.
void pack_words(const char* k, int64_t row_bytes, int64_t n0, int64_t n1, int64_t p0, int64_t p1, uint32_t* dst,
                int64_t ldb) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t p = p0; p < p1; ++p) std::memcpy(dst + p * ldb + n, k + n * row_bytes + 4 * p, 4);
}

#if defined(__x86_64__) || defined(_M_X64)
// The same in 16 x 16 blocks of words transposed in AVX-512 registers; the edges one at a time.
__attribute__((target("avx512f"))) void pack_words_avx512(const char* k, int64_t row_bytes, int64_t cols,
                                                          int64_t words, uint32_t* dst, int64_t ldb) {
  const int64_t n_full = cols / 16 * 16, p_full = words / 16 * 16;
  for (int64_t n0 = 0; n0 < n_full; n0 += 16) {
    for (int64_t p0 = 0; p0 < p_full; p0 += 16) {
      __m512i r[16], t[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(k + (n0 + i) * row_bytes + 4 * p0);
      for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
      }
      // r[4i + c], 128-bit lane L: word 4L + c of rows 4i .. 4i + 3
      for (int i = 0; i < 4; ++i) {
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
      }
      // word 4L + c of rows 0 .. 15: lane L of r[c], r[4 + c], r[8 + c], r[12 + c]
      for (int c = 0; c < 4; ++c) {
        const __m512i u0 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x44), u1 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xEE);
        const __m512i v0 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x44),
                      v1 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xEE);
        uint32_t* out = dst + (p0 + c) * ldb + n0;
        _mm512_storeu_si512(out, _mm512_shuffle_i32x4(u0, v0, 0x88));
        _mm512_storeu_si512(out + 4 * ldb, _mm512_shuffle_i32x4(u0, v0, 0xDD));
        _mm512_storeu_si512(out + 8 * ldb, _mm512_shuffle_i32x4(u1, v1, 0x88));
        _mm512_storeu_si512(out + 12 * ldb, _mm512_shuffle_i32x4(u1, v1, 0xDD));
      }
    }
    pack_words(k, row_bytes, n0, n0 + 16, p_full, words, dst, ldb);
  }
  pack_words(k, row_bytes, n_full, cols, 0, words, dst, ldb);
}
#endif

}  // namespace

void pack_vnni_transposed(const c10::BFloat16* k, int64_t ld, int64_t cols, int64_t d, c10::BFloat16* dst,
                          int64_t ldb) {
  // Each (k[n][2p], k[n][2p+1]) pair moves as one 32-bit word: a transpose of (cols, d / 2) words.
  const char* src = reinterpret_cast<const char*>(k);
  uint32_t* out = reinterpret_cast<uint32_t*>(dst);
#if defined(__x86_64__) || defined(_M_X64)
  if (active_isa() >= Isa::kAvx512) return pack_words_avx512(src, 2 * ld, cols, d / 2, out, ldb);
#endif
  pack_words(src, 2 * ld, 0, cols, 0, d / 2, out, ldb);
}

void pack_vnni(const c10::BFloat16* v, int64_t ld, int64_t rows, int64_t dv, c10::BFloat16* dst, int64_t ldb) {
  // As 16-bit words, one pair per 32-bit word: loops the compiler vectorises.
  const uint16_t* src = reinterpret_cast<const uint16_t*>(v);
  uint32_t* out32 = reinterpret_cast<uint32_t*>(dst);
  for (int64_t p = 0; p < (rows + 1) / 2; ++p) {
    const uint16_t* r0 = src + 2 * p * ld;
    uint32_t* out = out32 + p * ldb;
    if (2 * p + 1 < rows) {
      const uint16_t* r1 = r0 + ld;
      for (int64_t c = 0; c < dv; ++c) out[c] = uint32_t{r0[c]} | (uint32_t{r1[c]} << 16);
    } else {  // an odd last row, paired with zeros
      for (int64_t c = 0; c < dv; ++c) out[c] = r0[c];
    }
  }
}

const char* blas_backend() { return sgemm() != nullptr ? "sgemm from the linked BLAS" : "aten mm"; }

}  // namespace diffcirc::cpu
