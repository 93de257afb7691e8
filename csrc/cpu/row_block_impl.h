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

// acc[0, n) *= alpha
DC_TARGET inline void scale_row(float* acc, int64_t n, float alpha) {
  int64_t c = 0;
  if constexpr (V::W > 0) {
    const auto va = V::set1(alpha);
    for (; c + V::W <= n; c += V::W) V::store(acc + c, V::mul(V::load(acc + c), va));
  }
  for (; c < n; ++c) acc[c] *= alpha;
}

// Adds a row's probabilities p (float32, columns of the block) times f to its key-group accumulators acc.
DC_TARGET inline void add_group_runs(float* acc, const float* p, float f, const diffcirc::cpu::GroupRun* runs,
                                     int64_t n_runs) {
  for (int64_t k = 0; k < n_runs; ++k) {
    const auto& run = runs[k];
    const float* pr = p + run.col;
    float* dst = acc + run.group;
    int64_t t = 0;
    if (run.step == 1) {
      if constexpr (V::W > 0) {
        const auto vf = V::set1(f);
        for (; t + V::W <= run.len; t += V::W) V::store(dst + t, V::fmadd(V::load(pr + t), vf, V::load(dst + t)));
      }
      for (; t < run.len; ++t) dst[t] += pr[t] * f;
    } else {
      float sum = 0.f;
      if constexpr (V::W > 0) {
        auto vs = V::zero();
        for (; t + V::W <= run.len; t += V::W) vs = V::add(vs, V::load(pr + t));
        sum = V::hsum(vs);
      }
      for (; t < run.len; ++t) sum += pr[t];
      dst[0] += sum * f;
    }
  }
}

// Row r of the tile: two passes over its logits (block max, then p and the sums), exact for every
// input (masks, NaN / inf logits, any scale) and every statistic.
template <bool DIST, bool LAB, bool GROUPS>
DC_TARGET void process_row(const BlockArgs& a, int64_t r) {
  const int64_t cols = a.cols;
  float* s = a.s + r * a.ld_s;
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
    return;
  }
  a.alpha[r] = diffcirc::row_state_rescale(st, m_new);

  // 2. p = e^{s - m}, with the sums the statistics need
  const float qx = DIST ? a.qx[r] : 0.f, qy = DIST ? a.qy[r] : 0.f;
  const int32_t ql = LAB ? a.q_label[r] : 0;
  const bool keep_p32 = GROUPS && a.p_bf16;  // the group sums read p unrounded, from s
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
      if (a.p_bf16) {
        V::store_bf16(pb + j, p);
        if (keep_p32) V::store(s + j, p);
      } else {
        V::store(pf + j, p);
      }
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
    if (a.p_bf16) {
      pb[j] = float_to_bf16(p);
      if (keep_p32) s[j] = p;
    } else {
      pf[j] = p;
    }
  }
  diffcirc::row_state_add(st, sum_p, a.entropy ? sum_pz : 0.f, sum_pd, sum_pl);

  // 3. key-group accumulators (relative to their own max, row_state.h): this block's p added run by
  // run, times e^{m - m_ref}; rescaled first only if that factor would pass e^kGroupMassRescaleGap.
  // Masked keys have p = 0 exactly and add nothing.
  if constexpr (GROUPS) {
    float* acc = a.group_mass + r * a.n_groups;
    float& ref = a.group_ref[r];
    if (ref == -INFINITY) {
      ref = m_new;  // every accumulator is still 0: any reference will do
    } else if (m_new - ref > diffcirc::kGroupMassRescaleGap) {
      scale_row(acc, a.n_groups, std::exp(ref - m_new));
      ref = m_new;
    }
    add_group_runs(acc, a.p_bf16 ? s : pf, std::exp(m_new - ref), a.runs, a.n_runs);
  }
}

template <bool DIST, bool LAB, bool GROUPS>
DC_TARGET void process_rows(const BlockArgs& a) {
  for (int64_t r = 0; r < a.rows; ++r) process_row<DIST, LAB, GROUPS>(a, r);
}

template <bool GROUPS>
DC_TARGET void process_block_with(const BlockArgs& a) {
  const bool dist = a.kx != nullptr, lab = a.k_label != nullptr;
  if (dist && lab) process_rows<true, true, GROUPS>(a);
  else if (dist) process_rows<true, false, GROUPS>(a);
  else if (lab) process_rows<false, true, GROUPS>(a);
  else process_rows<false, false, GROUPS>(a);
}

// Blocks without a grouped key leave the key-group accumulators alone: a moving max is absorbed by
// their reference (row_state.h), so only blocks with runs do any key-group work.
DC_TARGET void process_block(const BlockArgs& a) {
  if (a.group_mass && a.n_runs > 0) process_block_with<true>(a);
  else process_block_with<false>(a);
}

}  // namespace
