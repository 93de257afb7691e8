// Schema of torch.ops.diffcirc.attention and the backend-independent pieces every backend uses:
// the input checks, the output allocation and the token-grid centres.
#include "attention.h"

#include <sstream>

#include <torch/library.h>

namespace diffcirc {
namespace {

std::string shape_of(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

std::string describe(const at::Tensor& t) {
  std::ostringstream s;
  s << t.scalar_type() << " " << t.sizes() << " on " << t.device();
  return s.str();
}

void check_same_device(const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK_VALUE(t.device() == q.device(), name, " must be on ", q.device(), " like q, got ", t.device());
}

}  // namespace

void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& key_padding_mask,
                            const std::optional<at::Tensor>& head_scale,
                            const std::optional<at::Tensor>& head_replacement, at::IntArrayRef grid,
                            const std::optional<at::Tensor>& q_labels, const std::optional<at::Tensor>& k_labels,
                            bool want_distance, bool want_label_mass, const std::optional<at::Tensor>& key_groups,
                            int64_t n_groups) {
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"q", &q}, {"k", &k}, {"v", &v}}) {
    TORCH_CHECK_VALUE(t->dim() == 4, name, " must be 4-D (B, H, N, D), got shape ", shape_of(*t));
    const auto st = t->scalar_type();
    TORCH_CHECK_VALUE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, name,
                      " must be float32, float16 or bfloat16, got ", st);
    TORCH_CHECK_VALUE(t->size(3) <= 1 || t->stride(3) == 1, name, " must have a contiguous last dim, got strides ",
                      t->strides());
  }
  TORCH_CHECK_VALUE(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
                    "q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  check_same_device("k", k, q);
  check_same_device("v", v, q);
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), D = q.size(3), Nk = k.size(2), Dv = v.size(3);
  TORCH_CHECK_VALUE(k.size(0) == B && k.size(1) == H && v.size(0) == B && v.size(1) == H,
                    "q, k, v must share (B, H); got q ", shape_of(q), ", k ", shape_of(k), ", v ", shape_of(v));
  TORCH_CHECK_VALUE(k.size(3) == D, "k must have head dim D = ", D, " like q, got k ", shape_of(k));
  TORCH_CHECK_VALUE(v.size(2) == Nk, "v must have Nk = ", Nk, " rows like k, got v ", shape_of(v));
  TORCH_CHECK_VALUE(D >= 1 && D <= 512 && Dv >= 1 && Dv <= 512, "head dims D and Dv must be in [1, 512], got D = ", D,
                    ", Dv = ", Dv);
  if (key_padding_mask) {
    const auto& m = *key_padding_mask;
    TORCH_CHECK_VALUE(m.scalar_type() == at::kBool && m.dim() == 2 && m.size(0) == B && m.size(1) == Nk,
                      "key_padding_mask must be bool of shape (B, Nk) = (", B, ", ", Nk, "), got ", describe(m));
    check_same_device("key_padding_mask", m, q);
  }
  if (head_scale) {
    const auto& s = *head_scale;
    TORCH_CHECK_VALUE(s.scalar_type() == at::kFloat && s.dim() == 2 && s.size(0) == B && s.size(1) == H,
                      "head_scale must be float32 of shape (B, H) = (", B, ", ", H, "), got ", describe(s));
    check_same_device("head_scale", s, q);
  }
  if (head_replacement) {
    const auto& r = *head_replacement;
    TORCH_CHECK_VALUE(r.scalar_type() == at::kFloat && r.dim() == 4 && r.size(0) == B && r.size(1) == H &&
                          r.size(2) == Nq && r.size(3) == Dv,
                      "head_replacement must be float32 of shape (B, H, Nq, Dv) = (", B, ", ", H, ", ", Nq, ", ", Dv,
                      "), got ", describe(r));
    check_same_device("head_replacement", r, q);
  }
  TORCH_CHECK_VALUE(grid.empty() || grid.size() == 4, "grid must be [hq, wq, hk, wk] or empty, got ", grid);
  if (grid.size() == 4) {
    TORCH_CHECK_VALUE(grid[0] >= 1 && grid[1] >= 1 && grid[2] >= 1 && grid[3] >= 1 && grid[0] * grid[1] == Nq &&
                          grid[2] * grid[3] == Nk,
                      "grid ", grid, " does not match Nq = ", Nq, ", Nk = ", Nk);
  }
  TORCH_CHECK_VALUE(!want_distance || grid.size() == 4, "stats 'distance' needs grid = [hq, wq, hk, wk]");
  TORCH_CHECK_VALUE(q_labels.has_value() == k_labels.has_value(), "labels: give both q_labels and k_labels or neither");
  TORCH_CHECK_VALUE(!want_label_mass || q_labels.has_value(), "stats 'label_mass' needs q_labels and k_labels");
  if (q_labels) {
    for (auto [name, t, n] : {std::tuple<const char*, const at::Tensor*, int64_t>{"q_labels", &*q_labels, Nq},
                              {"k_labels", &*k_labels, Nk}}) {
      TORCH_CHECK_VALUE(t->scalar_type() == at::kInt && t->dim() == 2 && t->size(0) == B && t->size(1) == n,
                        "labels: ", name, " must be int32 of shape (", B, ", ", n, "), got ", describe(*t));
      check_same_device(name, *t, q);
    }
  }
  if (key_groups) {
    const auto& g = *key_groups;
    TORCH_CHECK_VALUE(g.scalar_type() == at::kInt && g.dim() == 2 && g.size(0) == B && g.size(1) == Nk,
                      "key_groups must be int32 of shape (B, Nk) = (", B, ", ", Nk, "), got ", describe(g));
    check_same_device("key_groups", g, q);
    TORCH_CHECK_VALUE(n_groups >= 1 && n_groups <= kMaxKeyGroups, "n_groups must be in [1, ", kMaxKeyGroups,
                      "] with key_groups, got ", n_groups);
  } else {
    TORCH_CHECK_VALUE(n_groups == 0, "n_groups = ", n_groups, " given without key_groups (B, Nk) = (", B, ", ", Nk,
                      ")");
  }
}

AttentionResult allocate_attention_outputs(const at::Tensor& q, const at::Tensor& v, bool want_entropy,
                                           bool want_distance, bool want_label_mass, int64_t n_groups,
                                           bool sum_group_heads) {
  TORCH_CHECK_VALUE(!sum_group_heads || n_groups > 0, "sum_group_heads is for key_group_mass: give key_groups and "
                    "n_groups with it");
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), Dv = v.size(3);
  auto out = at::empty({B, Nq, H, Dv}, q.options()).transpose(1, 2);
  auto f32 = q.options().dtype(at::kFloat);
  auto stat = [&](bool on) { return on ? at::empty({B, H, Nq}, f32) : at::empty({0}, f32); };
  auto group_mass = n_groups == 0      ? at::empty({0}, f32)
                    : sum_group_heads ? at::zeros({B, 1, Nq, n_groups}, f32)
                                      : at::empty({B, H, Nq, n_groups}, f32);
  return {out, stat(true), stat(want_entropy), stat(want_distance), stat(want_label_mass), group_mass};
}

std::pair<at::Tensor, at::Tensor> grid_centres(int64_t h, int64_t w, const at::TensorOptions& options) {
  auto n = at::arange(h * w, options.dtype(at::kLong));
  auto row = (at::div(n, w, "floor").to(at::kFloat) + 0.5) / static_cast<double>(h);
  auto col = (at::remainder(n, w).to(at::kFloat) + 0.5) / static_cast<double>(w);
  return {row.to(options), col.to(options)};
}

}  // namespace diffcirc

TORCH_LIBRARY(diffcirc, m) {
  m.def(
      "attention(Tensor q, Tensor k, Tensor v, float scale, Tensor? key_padding_mask, Tensor? head_scale, "
      "Tensor? head_replacement, int[] grid, Tensor? q_labels, Tensor? k_labels, bool entropy, bool distance, "
      "bool label_mass, Tensor? key_groups=None, int n_groups=0, bool sum_group_heads=False) -> (Tensor out, "
      "Tensor lse, Tensor entropy, Tensor distance, Tensor label_mass, Tensor key_group_mass)");
}
