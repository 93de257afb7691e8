// AVX-512 variant of the per-block row work (16 float lanes). Only the functions in this file
// are compiled for AVX-512 (target attribute), so the library still loads on older CPUs.
#if defined(__x86_64__) || defined(_M_X64)
#include "row_kernels.h"

#define DC_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx2,f16c")))

#include "simd_avx512.h"
#include "row_block_impl.h"
#include "row_fast_avx512.h"

namespace diffcirc::cpu {
void process_block_avx512(const BlockArgs& a) { process_block_fast_or_exact(a); }
}  // namespace diffcirc::cpu

#else  // not x86-64: never selected at run time
#include "row_kernels.h"
namespace diffcirc::cpu {
void process_block_avx512(const BlockArgs& a) { process_block_scalar(a); }
}  // namespace diffcirc::cpu
#endif
