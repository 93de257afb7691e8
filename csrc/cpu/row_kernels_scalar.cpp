// Portable variant of the per-block row work: plain C++ (the compiler may still vectorise).
#include "row_kernels.h"

#define DC_TARGET

namespace {
// W = 0: no vector loop, every column goes through the scalar tail of row_block_impl.h. Every
// V:: use there sits in an `if constexpr (V::W > 0)` branch, discarded here, so the members below
// are declarations only: they exist for name lookup in those branches and are never called (hence
// never defined).
struct V {
  static constexpr int W = 0;
  using reg = float;
  using lanes = bool;
  static reg zero();
  static reg set1(float x);
  static reg load(const float* p);
  static void store(float* p, reg x);
  static reg add(reg a, reg b);
  static reg sub(reg a, reg b);
  static reg mul(reg a, reg b);
  static reg max(reg a, reg b);
  static reg fmadd(reg a, reg b, reg c);
  static reg sqrt(reg a);
  static float hsum(reg a);
  static lanes no_lanes();
  static lanes or_poison(lanes acc, reg x);
  static lanes or_poison_unmasked(lanes acc, reg x, reg b);
  static bool any(lanes acc);
  static float hmax(reg a);
  static reg select_eq(const int32_t* labels, int32_t ql, reg p);
  static reg exp(reg x);
  static void store_bf16(uint16_t* dst, reg x);
};
}  // namespace

#include "row_block_impl.h"

namespace diffcirc::cpu {
void process_block_scalar(const BlockArgs& a) { process_block(a); }
}  // namespace diffcirc::cpu
