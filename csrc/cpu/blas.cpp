#include "blas.h"

#include <dlfcn.h>

#include <cstring>

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

void pack_vnni_transposed(const c10::BFloat16* k, int64_t ld, int64_t cols, int64_t d, c10::BFloat16* dst,
                          int64_t ldb) {
  // Each (k[n][2p], k[n][2p+1]) pair moves as one 32-bit word: a transpose of (cols, d / 2) words.
  for (int64_t n = 0; n < cols; ++n) {
    const c10::BFloat16* row = k + n * ld;
    for (int64_t p = 0; p < d / 2; ++p) std::memcpy(dst + 2 * (p * ldb + n), row + 2 * p, 4);
  }
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
