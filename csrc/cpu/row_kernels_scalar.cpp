// Portable variant of the per-block row work: plain C++ (the compiler may still vectorise).
#include <cmath>
#include <cstring>

#include "row_kernels.h"

#define DC_TARGET

namespace {
struct V {
  static constexpr int W = 0;  // no vector loop: every column goes through the scalar tail
  using reg = float;
  static reg zero() { return 0.f; }
  static reg set1(float x) { return x; }
  static reg load(const float* p) { return *p; }
  static void store(float* p, reg x) { *p = x; }
  static reg add(reg a, reg b) { return a + b; }
  static reg sub(reg a, reg b) { return a - b; }
  static reg mul(reg a, reg b) { return a * b; }
  static reg max(reg a, reg b) { return a > b ? a : b; }  // b when either is NaN, like MAXPS
  static reg fmadd(reg a, reg b, reg c) { return a * b + c; }
  static reg sqrt(reg a) { return std::sqrt(a); }
  static float hsum(reg a) { return a; }
  using lanes = bool;
  static lanes no_lanes() { return false; }
  static lanes or_poison(lanes acc, reg x) { return acc || !(x < INFINITY); }
  static lanes or_poison_unmasked(lanes acc, reg x, reg b) { return acc || (b > -INFINITY && !(x < INFINITY)); }
  static bool any(lanes acc) { return acc; }
  static float hmax(reg a) { return a; }
  static reg select_eq(const int32_t* labels, int32_t ql, reg p) { return *labels == ql ? p : 0.f; }
  static reg exp(reg x) { return x >= -87.33654f ? std::exp(x) : 0.f; }
  static void store_bf16(uint16_t* dst, reg x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    *dst = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
};
}  // namespace

#include "row_block_impl.h"

namespace diffcirc::cpu {
void process_block_scalar(const BlockArgs& a) { process_block(a); }
}  // namespace diffcirc::cpu
