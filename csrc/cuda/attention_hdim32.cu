// Forward kernels of the fused attention op for head dims padded to 32 (fp32, fp16, bf16).
#include "attention_kernel.cuh"

namespace diffcirc::cuda {
DIFFCIRC_INSTANTIATE_ATTENTION_BUCKET(32)
}  // namespace diffcirc::cuda
