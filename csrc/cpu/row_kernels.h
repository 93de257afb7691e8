// Per-block row work of the CPU kernel: online softmax + statistics over one (query block,
// key block) tile of logits, in three instruction-set variants chosen at run time.
#pragma once

#include <cstdint>

#include "../row_state.h"
#include "isa.h"

namespace diffcirc::cpu {

// One tile: rows of query-key dot products against cols keys.
struct BlockArgs {
  const float* s;          // (rows, ld_s) raw dot products q.k
  int64_t ld_s;
  float scale;             // softmax scale applied to s here (the GEMMs stay scale-free)
  void* p;                 // (rows, ld_p) out: e^{s - m_new}, float32 or bfloat16 (see p_bf16)
  int64_t ld_p;
  bool p_bf16;
  int64_t rows, cols;
  const float* key_bias;   // (cols) 0 or -inf for masked keys; nullptr = no mask
  const float* kx;         // (cols) key grid coordinates, for distance; else nullptr
  const float* ky;
  const float* qx;         // (rows) query grid coordinates
  const float* qy;
  const int32_t* k_label;  // (cols) key labels, for label mass; else nullptr
  const int32_t* q_label;  // (rows)
  bool entropy;
  RowState* state;         // (rows) updated in place
  float* alpha;            // (rows) out: factor to rescale each output-accumulator row by
};

using ProcessBlockFn = void (*)(const BlockArgs&);

void process_block_scalar(const BlockArgs& a);
void process_block_avx2(const BlockArgs& a);
void process_block_avx512(const BlockArgs& a);

// The variant compiled for isa.
inline ProcessBlockFn process_block_for(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return process_block_avx512;
    case Isa::kAvx2: return process_block_avx2;
    default: return process_block_scalar;
  }
}

}  // namespace diffcirc::cpu
