// Online-softmax row state with in-kernel statistics, shared by the CPU and the CUDA kernels.
//
// For one query row the kernels stream over key blocks. With s_j the scaled logits and m the
// running max, the state holds
//   l    = sum_j e^{s_j - m}
//   ent  = sum_j e^{s_j - m} (s_j - m)            (<= 0 when m is the max: entropy = ln l - ent / l
//                                                  then has no cancellation; see m below)
//   dist = sum_j e^{s_j - m} ||g_q - g_k(j)||
//   lab  = sum_j e^{s_j - m} [label_k(j) == label_q]
// Every statistic but entropy is a mass, acc / l: the probability-weighted sum of a per-key value.
// Key-group mass is the one whose state does not fit here: G accumulators per row (G is a run-time
// size), kept relative to a reference max of their own, m_ref <= m, rather than to m:
//   grp[g] = sum_{j in group g} e^{s_j - m_ref}
// so that a moving max costs them nothing (a block's p, taken relative to m, is added times
// e^{m - m_ref} >= 1); they are rescaled to m_ref = m only when that factor would pass
// e^kGroupMassRescaleGap, and finished by group_mass_factor. Label mass is key-group mass read at
// the query's own label: the kernels keep its one accumulator (a compare per key) rather than G.
// A block's partial sums are taken relative to the new max before they are added, so merging is
// a rescale by alpha = e^{m_old - m_new} followed by an add. Every formula is written with
// selects, never 0 * (-inf), so masked keys and fully masked rows produce no NaN.
#pragma once

#include <math.h>

#if defined(__CUDACC__)
#define DC_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DC_HOST_DEVICE inline
#endif

namespace diffcirc {

// Exponents below this give exactly 0 in float32 (e^-104 is under the smallest subnormal), so
// shifted logits are clamped here: masked keys (-inf) then contribute p = 0 and p * z = 0.
constexpr float kMinShiftedLogit = -104.0f;

// e^z for z below this (about ln FLT_MIN, where float32 leaves the normal range) is taken as
// exactly 0 by every kernel: the CPU vector exps keep z >= kExpUnderflow, the CPU scalar tail and
// the CUDA kernel keep z > kExpUnderflow (the two differ only at z == kExpUnderflow itself).
constexpr float kExpUnderflow = -87.33654f;

struct RowState {
  float m;     // running max of the logits (-inf while no key was seen); on the CPU's one-pass rows
               // (cpu/row_fast_avx512.h) a reference that may trail it by up to 8 nats, so that
               // e^{s - m} <= e^8: every sum and the lse hold as well relative to it
  float l;     // sum of e^{s - m}
  float ent;   // sum of e^{s - m} (s - m)
  float dist;  // sum of e^{s - m} * distance
  float lab;   // sum of e^{s - m} * same-label
};

struct RowStats {
  float inv_l;       // 1 / l, or 0 for a fully masked row (so out = 0)
  float lse;         // m + ln l, or -inf
  float entropy;     // nats, >= 0
  float distance;
  float label_mass;
};

DC_HOST_DEVICE RowState row_state_init() { return RowState{-INFINITY, 0.f, 0.f, 0.f, 0.f}; }

// Moves the state to a new running max m_new >= m and returns alpha = e^{m - m_new}, the
// factor by which the caller must rescale its output accumulator. A state that has seen no key
// (l == 0) has nothing to rescale and returns 0.
DC_HOST_DEVICE float row_state_rescale(RowState& st, float m_new) {
  const bool empty = !(st.l > 0.f);
  const float delta = empty ? 0.f : st.m - m_new;  // <= 0
  const float alpha = empty ? 0.f : expf(delta);
  st.ent = alpha * (st.ent + delta * st.l);
  st.l *= alpha;
  st.dist *= alpha;
  st.lab *= alpha;
  st.m = m_new;
  return alpha;
}

// Adds a block's sums, each already taken relative to the current max st.m.
DC_HOST_DEVICE void row_state_add(RowState& st, float sum_p, float sum_pz, float sum_pd, float sum_pl) {
  st.l += sum_p;
  st.ent += sum_pz;
  st.dist += sum_pd;
  st.lab += sum_pl;
}

// Shifted logit z = s - m clamped so that e^z is exactly 0 for masked keys (see kMinShiftedLogit).
DC_HOST_DEVICE float shifted_logit(float s, float m) {
  const float z = s - m;
  return z > kMinShiftedLogit ? z : kMinShiftedLogit;
}

// Marks the row as having seen a NaN or +inf logit of an unmasked key (from NaN / inf inputs; torch's
// softmax gives NaN there too): its outputs and statistics become NaN instead of a silently wrong
// finite value. Poison persists: l stays NaN through every later rescale and add.
DC_HOST_DEVICE void row_state_poison(RowState& st) {
  st.l = NAN;
  st.ent = NAN;
  st.dist = NAN;
  st.lab = NAN;
}

DC_HOST_DEVICE RowStats row_state_finalize(const RowState& st) {
  if (st.l != st.l) return RowStats{NAN, NAN, NAN, NAN, NAN};  // poisoned
  if (!(st.l > 0.f)) return RowStats{0.f, -INFINITY, 0.f, 0.f, 0.f};
  const float inv_l = 1.f / st.l;
  const float log_l = logf(st.l);
  float entropy = log_l - st.ent * inv_l;
  entropy = entropy > 0.f ? entropy : 0.f;  // rounding can dip below the true minimum of 0
  return RowStats{inv_l, st.m + log_l, entropy, st.dist * inv_l, st.lab * inv_l};
}

// Largest gap m - m_ref that key-group accumulators tolerate before they are rescaled: a block's p
// is added times at most e^8 (about 3000), far from float32's range whatever the number of keys.
constexpr float kGroupMassRescaleGap = 8.0f;

// What turns key-group accumulators relative to m_ref (-inf while none was added to) into masses:
// e^{m_ref - m} / l; NaN for a poisoned row (inv_l is NaN), 0 for one without grouped keys.
DC_HOST_DEVICE float group_mass_factor(float m_ref, const RowState& st, const RowStats& rs) {
  return m_ref == -INFINITY ? 0.f * rs.inv_l : expf(m_ref - st.m) * rs.inv_l;
}

}  // namespace diffcirc
