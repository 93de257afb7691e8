// Per-block row work of the CPU kernel: online softmax + statistics over one (query block,
// key block) tile of logits, in four instruction-set variants chosen at run time.
#pragma once

#include <cstdint>

#include "../row_state.h"
#include "isa.h"

namespace diffcirc::cpu {

// Grouped keys of one key block as runs, so that a row adds its probabilities group by group with
// vector loads instead of one scattered add per key: keys col .. col + len - 1 belong to groups
// group, group + step, ..., step 1 (each key its own group: a prompt's tokens) or 0 (one group: a
// word of several tokens, a region). Keys in no group are in no run.
struct GroupRun {
  int32_t col;    // first key, relative to the block
  int32_t group;  // its group
  int32_t len;    // keys in the run, >= 1
  int32_t step;   // 1 or 0
};

// One tile: rows of query-key dot products against cols keys.
struct BlockArgs {
  float* s;                // (rows, ld_s) raw dot products q.k; with key groups and p_bf16, overwritten by
                           // float32 p, which the group sums read
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
  float* group_mass;       // (rows, n_groups) key-group accumulators (row_state.h), updated in place; else nullptr
  int64_t n_groups;
  float* group_ref;        // (rows) the max each row's accumulators are relative to, -inf until the first add
  const GroupRun* runs;    // (n_runs) this block's grouped keys
  int64_t n_runs;
  RowState* state;         // (rows) updated in place
  float* alpha;            // (rows) out: factor to rescale each output-accumulator row by
};

using ProcessBlockFn = void (*)(const BlockArgs&);

void process_block_scalar(const BlockArgs& a);
void process_block_avx2(const BlockArgs& a);
void process_block_avx512(const BlockArgs& a);
void process_block_avx512bf16(const BlockArgs& a);

// The variant compiled for isa.
inline ProcessBlockFn process_block_for(Isa isa) {
  switch (isa) {
    case Isa::kAvx512Bf16: return process_block_avx512bf16;
    case Isa::kAvx512: return process_block_avx512;
    case Isa::kAvx2: return process_block_avx2;
    default: return process_block_scalar;
  }
}

}  // namespace diffcirc::cpu
