#include "isa.h"

#include <cstdlib>

#include <c10/util/Exception.h>

namespace diffcirc::cpu {
namespace {

// The best instruction set this CPU supports.
Isa detect_isa() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

Isa parse_isa(const std::string& name) {
  if (name == "avx512") return Isa::kAvx512;
  if (name == "avx2") return Isa::kAvx2;
  if (name == "scalar") return Isa::kScalar;
  TORCH_CHECK_VALUE(false, "CPU ISA must be one of avx512, avx2, scalar; got '", name, "'");
}

const char* isa_label(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

// The best the CPU supports, capped by DIFFCIRC_CPU_ISA when set; set_isa writes it.
Isa& active_isa_slot() {
  static Isa isa = [] {
    Isa best = detect_isa();
    if (const char* env = std::getenv("DIFFCIRC_CPU_ISA")) {
      const Isa wanted = parse_isa(env);
      if (static_cast<int>(wanted) < static_cast<int>(best)) best = wanted;
    }
    return best;
  }();
  return isa;
}

}  // namespace

Isa active_isa() { return active_isa_slot(); }

std::string isa_name() { return isa_label(active_isa()); }

std::string set_isa(const std::string& name) {
  const Isa wanted = parse_isa(name);
  TORCH_CHECK_VALUE(static_cast<int>(wanted) <= static_cast<int>(detect_isa()), "this CPU does not support ", name);
  active_isa_slot() = wanted;
  return isa_name();
}

}  // namespace diffcirc::cpu
