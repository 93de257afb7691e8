// AVX-512 variant of the per-block row work for CPUs with AVX512-BF16 (Intel since Cooper Lake,
// AMD since Zen 4): the AVX-512 kernel with p packed to bfloat16 by VCVTNEPS2BF16 (simd_avx512.h).
#if defined(__x86_64__) || defined(_M_X64)
#include "row_kernels.h"

#define DC_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,avx2,f16c")))
#define DC_NATIVE_BF16

#include "simd_avx512.h"
#include "row_block_impl.h"
#include "row_fast_avx512.h"

namespace diffcirc::cpu {
void process_block_avx512bf16(const BlockArgs& a) { process_block_fast_or_exact(a); }
}  // namespace diffcirc::cpu

#else  // not x86-64: never selected at run time
#include "row_kernels.h"
namespace diffcirc::cpu {
void process_block_avx512bf16(const BlockArgs& a) { process_block_scalar(a); }
}  // namespace diffcirc::cpu
#endif
