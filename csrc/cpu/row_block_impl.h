// The body of process_block_*, written once over a SIMD traits class V and included by each
// instruction-set file (row_kernels_{scalar,avx2,avx512}.cpp) inside an anonymous namespace.
// V provides W (lanes; 0 = scalar only) and the vector operations used below; every function
// carries DC_TARGET so that each file compiles for its own instruction set only.
//
// Requires before inclusion: DC_TARGET, struct V, and "row_kernels.h".

#include <cmath>
#include <cstring>

namespace {

using diffcirc::RowState;
using diffcirc::cpu::BlockArgs;

DC_TARGET inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);  // round to nearest even; p is finite
  return static_cast<uint16_t>(u >> 16);
}

template <bool DIST, bool LAB>
DC_TARGET void process_rows(const BlockArgs& a) {
  const int64_t cols = a.cols;
  for (int64_t r = 0; r < a.rows; ++r) {
    const float* s = a.s + r * a.ld_s;
    float* pf = static_cast<float*>(a.p) + r * a.ld_p;
    uint16_t* pb = static_cast<uint16_t*>(a.p) + r * a.ld_p;
    const float* bias = a.key_bias;
    const float scale = a.scale;

    // 1. block max of the logits scale * s (masked keys read as -inf)
    // A masked key never influences its row: its logit may be NaN or +inf (garbage in a padded k
    // row) without poisoning it, as in the reference and PyTorch's SDPA. Adding its -inf bias then
    // gives NaN, which every max below skips (it is the first operand; see V::max) and which pass 2
    // turns into p = 0 (see shifted_logit), so no extra pass or select is needed.
    float mb = -INFINITY;
    bool poisoned = false;  // an unmasked key's NaN or +inf logit (NaN / inf inputs): the row is NaN
    int64_t j = 0;
    if constexpr (V::W > 0) {
      const auto vscale = V::set1(scale);
      auto vm = V::set1(-INFINITY);
      auto bad = V::no_lanes();
      for (; j + V::W <= cols; j += V::W) {
        auto x = V::mul(V::load(s + j), vscale);
        if (bias) {
          const auto b = V::load(bias + j);
          bad = V::or_poison_unmasked(bad, x, b);
          x = V::add(x, b);
        } else {
          bad = V::or_poison(bad, x);
        }
        vm = V::max(x, vm);  // x first: a NaN x leaves vm as it was
      }
      mb = V::hmax(vm);
      poisoned = V::any(bad);
    }
    for (; j < cols; ++j) {
      float x = s[j] * scale;
      const float b = bias ? bias[j] : 0.f;
      poisoned |= b > -INFINITY && !(x < INFINITY);  // masked keys (bias -inf) never poison
      x += b;
      mb = x > mb ? x : mb;  // false for a NaN x: skipped
    }

    RowState& st = a.state[r];
    const float m_new = st.m > mb ? st.m : mb;
    // A poisoned row, or every key so far masked: nothing to add, the p row must be 0.
    if (poisoned || m_new == -INFINITY) {
      if (poisoned) diffcirc::row_state_poison(st);
      if (a.p_bf16) std::memset(pb, 0, cols * sizeof(uint16_t));
      else std::memset(pf, 0, cols * sizeof(float));
      a.alpha[r] = 1.f;
      continue;
    }
    a.alpha[r] = diffcirc::row_state_rescale(st, m_new);

    // 2. p = e^{s - m}, with the sums the statistics need
    const float qx = DIST ? a.qx[r] : 0.f, qy = DIST ? a.qy[r] : 0.f;
    const int32_t ql = LAB ? a.q_label[r] : 0;
    float sum_p = 0.f, sum_pz = 0.f, sum_pd = 0.f, sum_pl = 0.f;
    j = 0;
    if constexpr (V::W > 0) {
      const auto vmnew = V::set1(m_new), vmin = V::set1(diffcirc::kMinShiftedLogit), vscale = V::set1(scale);
      const auto vqx = V::set1(qx), vqy = V::set1(qy);
      auto acc_p = V::zero(), acc_pz = V::zero(), acc_pd = V::zero(), acc_pl = V::zero();
      for (; j + V::W <= cols; j += V::W) {
        auto x = V::mul(V::load(s + j), vscale);
        if (bias) x = V::add(x, V::load(bias + j));
        // z - m first: a masked key's NaN (NaN / +inf logit + -inf bias) becomes vmin, so p = 0
        const auto z = V::max(V::sub(x, vmnew), vmin);
        const auto p = V::exp(z);
        acc_p = V::add(acc_p, p);
        if (a.entropy) acc_pz = V::fmadd(p, z, acc_pz);
        if constexpr (DIST) {
          const auto dx = V::sub(V::load(a.kx + j), vqx), dy = V::sub(V::load(a.ky + j), vqy);
          acc_pd = V::fmadd(p, V::sqrt(V::fmadd(dx, dx, V::mul(dy, dy))), acc_pd);
        }
        if constexpr (LAB) acc_pl = V::add(acc_pl, V::select_eq(a.k_label + j, ql, p));
        if (a.p_bf16) V::store_bf16(pb + j, p);
        else V::store(pf + j, p);
      }
      sum_p = V::hsum(acc_p);
      sum_pz = V::hsum(acc_pz);
      sum_pd = V::hsum(acc_pd);
      sum_pl = V::hsum(acc_pl);
    }
    for (; j < cols; ++j) {
      const float z = diffcirc::shifted_logit(s[j] * scale + (bias ? bias[j] : 0.f), m_new);
      // > here, >= in the vector V::exp: they differ only at z == kExpUnderflow (see row_state.h)
      const float p = z > diffcirc::kExpUnderflow ? std::exp(z) : 0.f;
      sum_p += p;
      sum_pz += p * z;
      if constexpr (DIST) {
        const float dx = a.kx[j] - qx, dy = a.ky[j] - qy;
        sum_pd += p * std::sqrt(dx * dx + dy * dy);
      }
      if constexpr (LAB) sum_pl += a.k_label[j] == ql ? p : 0.f;
      if (a.p_bf16) pb[j] = float_to_bf16(p);
      else pf[j] = p;
    }
    diffcirc::row_state_add(st, sum_p, a.entropy ? sum_pz : 0.f, sum_pd, sum_pl);
  }
}

DC_TARGET void process_block(const BlockArgs& a) {
  const bool dist = a.kx != nullptr, lab = a.k_label != nullptr;
  if (dist && lab) process_rows<true, true>(a);
  else if (dist) process_rows<true, false>(a);
  else if (lab) process_rows<false, true>(a);
  else process_rows<false, false>(a);
}

}  // namespace
