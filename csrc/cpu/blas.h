// Row-major GEMMs for the CPU kernel's tiles: C = alpha * op(A) op(B) + beta * C, float32 out.
//
// The BLAS linked into libtorch (MKL in the x86-64 wheels) is looked up at run time, so the
// tiles go to the tuned sgemm / bf16 GEMM without a copy of the strided inputs; builds of torch
// without those symbols fall back to ATen's mm on the same memory.
#pragma once

#include <cstdint>

#include <c10/util/BFloat16.h>

namespace diffcirc::cpu {

// a: (M, K) or, with trans_a, (K, M), row stride lda; b: (K, N) or, with trans_b, (N, K); c: (M, N).
void gemm_f32(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
              int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

// bfloat16 inputs, float32 accumulation and output.
void gemm_bf16(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
               const c10::BFloat16* a, int64_t lda, const c10::BFloat16* b, int64_t ldb, float beta, float* c,
               int64_t ldc);

// Whether gemm_bf16 runs a native bf16 GEMM (else inputs should be widened to float32 first).
bool has_native_bf16_gemm();

// "mkl" when the tuned BLAS was found, else "aten".
const char* blas_backend();

}  // namespace diffcirc::cpu
