#include "blas.h"

#include <dlfcn.h>

#include <ATen/ATen.h>

namespace diffcirc::cpu {
namespace {

// Fortran sgemm (column-major) and MKL's cblas bf16 GEMM, as exported by libtorch_cpu.
using SgemmFn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                         const int*, const float*, const int*, const float*, float*, const int*);
using Bf16GemmFn = void (*)(int, int, int, int, int, int, float, const uint16_t*, int, const uint16_t*, int, float,
                            float*, int);
constexpr int kCblasRowMajor = 101, kCblasNoTrans = 111, kCblasTrans = 112;

struct Symbols {
  SgemmFn sgemm = nullptr;
  Bf16GemmFn bf16 = nullptr;
  Symbols() {
    sgemm = reinterpret_cast<SgemmFn>(dlsym(RTLD_DEFAULT, "sgemm_"));
    bf16 = reinterpret_cast<Bf16GemmFn>(dlsym(RTLD_DEFAULT, "cblas_gemm_bf16bf16f32"));
  }
};

const Symbols& symbols() {
  static const Symbols s;
  return s;
}

// Views the row-major operand as a (rows, cols) tensor without copying.
at::Tensor view(const void* p, bool trans, int64_t rows, int64_t cols, int64_t ld, at::ScalarType t) {
  auto x = at::from_blob(const_cast<void*>(p), {trans ? cols : rows, trans ? rows : cols}, {ld, 1},
                         at::TensorOptions().dtype(t));
  return trans ? x.t() : x;
}

void gemm_aten(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const void* a, int64_t lda,
               const void* b, int64_t ldb, float beta, float* c, int64_t ldc, at::ScalarType t) {
  auto A = view(a, ta, m, k, lda, t).to(at::kFloat);
  auto B = view(b, tb, k, n, ldb, t).to(at::kFloat);
  auto C = at::from_blob(c, {m, n}, {ldc, 1}, at::TensorOptions().dtype(at::kFloat));
  if (beta == 0.f) C.copy_(at::mm(A, B).mul_(alpha));
  else C.mul_(beta).add_(at::mm(A, B), alpha);
}

}  // namespace

void gemm_f32(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
              const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (auto f = symbols().sgemm) {
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
    const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    const char tA = tb ? 'T' : 'N', tB = ta ? 'T' : 'N';
    f(&tA, &tB, &M, &N, &K, &alpha, b, &la, a, &lb, &beta, c, &lc);
    return;
  }
  gemm_aten(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, at::kFloat);
}

void gemm_bf16(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const c10::BFloat16* a, int64_t lda,
               const c10::BFloat16* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (auto f = symbols().bf16) {
    f(kCblasRowMajor, ta ? kCblasTrans : kCblasNoTrans, tb ? kCblasTrans : kCblasNoTrans, static_cast<int>(m),
      static_cast<int>(n), static_cast<int>(k), alpha, reinterpret_cast<const uint16_t*>(a), static_cast<int>(lda),
      reinterpret_cast<const uint16_t*>(b), static_cast<int>(ldb), beta, c, static_cast<int>(ldc));
    return;
  }
  gemm_aten(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, at::kBFloat16);
}

bool has_native_bf16_gemm() { return symbols().bf16 != nullptr; }

const char* blas_backend() { return symbols().sgemm != nullptr ? "mkl" : "aten"; }

}  // namespace diffcirc::cpu
