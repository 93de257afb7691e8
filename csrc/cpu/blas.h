// GEMMs for the CPU kernel's tiles, float32 out.
//
// float32: the sgemm of the BLAS linked into libtorch (MKL in the x86-64 wheels), looked up at
// run time and called on the strided inputs without copies; ATen's mm where it is missing.
// bfloat16: oneDNN's brgemm micro-kernel, several times faster than MKL's bf16 GEMM on CPUs that
// are not Intel's, on pair-interleaved packed B operands.
#pragma once

#include <cstdint>

#include <c10/util/BFloat16.h>

namespace diffcirc::cpu {

// a: (M, K) or, with trans_a, (K, M), row stride lda; b: (K, N) or, with trans_b, (N, K); c: (M, N).
void gemm_f32(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
              int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

// oneDNN's bf16 micro-kernel (through ATen's cpublas::brgemm), the fastest bf16 path on CPUs
// with AVX-512: C (M, N) (+)= A (M, K) B (K, N), float32 C; A row-major with row stride lda,
// K even; B packed pair-interleaved ("VNNI"): (K / 2, N, 2) with ldb >= N pairs per row, see pack_vnni_* below.
void brgemm_bf16_vnni(int64_t m, int64_t n, int64_t k, const c10::BFloat16* a, int64_t lda, const c10::BFloat16* b,
                      int64_t ldb, float* c, int64_t ldc, bool accumulate);
// oneDNN's float32 micro-kernel: C (M, N) (+)= A (M, K) B (K, N), all row-major with row strides
// lda, ldb, ldc. Faster than the BLAS's sgemm on the P V product (no copies of B, a kernel for the
// exact shape); where it is missing, gemm_f32.
void brgemm_f32(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                int64_t ldc, bool accumulate);
// Must be called by each thread after its last brgemm_bf16_vnni call (AMX tiles; brgemm_f32 holds none).
void brgemm_release();
// Whether brgemm_bf16_vnni / brgemm_f32 work on this CPU (probed once on a tiny product).
bool has_brgemm_bf16();
bool has_brgemm_f32();

// Packs K^T for scores = Q K^T: k rows (cols, d) with row stride ld, d even -> (d / 2, cols, 2),
// ldb >= cols pairs per row of dst.
void pack_vnni_transposed(const c10::BFloat16* k, int64_t ld, int64_t cols, int64_t d, c10::BFloat16* dst,
                          int64_t ldb);
// Packs V for O += P V: v rows (rows, dv) with row stride ld -> (ceil(rows / 2), dv, 2), an odd
// last row paired with zeros; ldb >= dv pairs per row of dst.
void pack_vnni(const c10::BFloat16* v, int64_t ld, int64_t rows, int64_t dv, c10::BFloat16* dst, int64_t ldb);

// Which float32 GEMM the tiles use.
const char* blas_backend();

}  // namespace diffcirc::cpu
