// The Python module diffcirc._C: what was built and which CPU instruction set runs (read by
// `python -m diffcirc.info`, the benchmarks and the tests). The op itself is not here: it is
// reached through the dispatcher as torch.ops.diffcirc.attention (attention.cpp).
#include <sstream>
#include <string>
#include <vector>

#include <torch/extension.h>

#include "cpu/blas.h"
#include "cpu/isa.h"

namespace {

// CUDA architectures the extension was compiled for (empty without CUDA).
std::vector<std::string> cuda_archs() {
#ifdef DIFFCIRC_CUDA_ARCHS
  std::vector<std::string> archs;
  std::istringstream s(DIFFCIRC_CUDA_ARCHS);
  for (std::string a; std::getline(s, a, ';');)
    if (!a.empty()) archs.push_back(a);
  return archs;
#else
  return {};
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "diffcirc kernels; the op is torch.ops.diffcirc.attention";
  m.def("cpu_isa", &diffcirc::cpu::isa_name, "instruction set of the CPU row kernels");
  m.def("set_cpu_isa", &diffcirc::cpu::set_isa, "cap the CPU instruction set: avx512bf16, avx512, avx2 or scalar");
  m.def("cpu_features", &diffcirc::cpu::cpu_features,
        "the CPU's bfloat16 / float16 extensions: of avx512bf16, avx512fp16, amx-tile, amx-bf16, amx-fp16");
  m.def("blas_backend", []() { return std::string(diffcirc::cpu::blas_backend()); });
  m.def("cuda_archs", &cuda_archs, "CUDA architectures compiled in (empty without CUDA)");
}
