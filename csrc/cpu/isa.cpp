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
    return __builtin_cpu_supports("avx512bf16") ? Isa::kAvx512Bf16 : Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

Isa parse_isa(const std::string& name) {
  if (name == "avx512bf16") return Isa::kAvx512Bf16;
  if (name == "avx512") return Isa::kAvx512;
  if (name == "avx2") return Isa::kAvx2;
  if (name == "scalar") return Isa::kScalar;
  TORCH_CHECK_VALUE(false, "CPU ISA must be one of avx512bf16, avx512, avx2, scalar; got '", name, "'");
}

const char* isa_label(Isa isa) {
  switch (isa) {
    case Isa::kAvx512Bf16: return "avx512bf16";
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

namespace diffcirc::cpu {

std::vector<std::string> cpu_features() {
  std::vector<std::string> found;
#if defined(__x86_64__) || defined(_M_X64)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  __asm__("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(0), "c"(0));
  if (eax < 7) return found;  // no leaf 7: none of these
  // CPUID leaf 7: sub-leaf 0 has AMX-BF16 (EDX 22), AVX512-FP16 (EDX 23), AMX-TILE (EDX 24);
  // sub-leaf 1 has AVX512-BF16 (EAX 5) and AMX-FP16 (EAX 21).
  __asm__("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(7), "c"(0));
  const unsigned edx0 = edx, max_subleaf = eax;
  unsigned eax1 = 0;
  if (max_subleaf >= 1) {
    __asm__("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(7), "c"(1));
    eax1 = eax;
  }
  // The OS saves AMX tile state only where XCR0 has XTILECFG and XTILEDATA (bits 17, 18),
  __asm__("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(1), "c"(0));
  // and AVX-512 state (opmask, ZMM: bits 5-7) with SSE and AVX state (bits 1-2)
  bool amx_enabled = false, avx512_enabled = false;
  if (ecx & (1u << 27)) {  // OSXSAVE: XGETBV is available
    unsigned lo = 0, hi = 0;
    __asm__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    amx_enabled = (lo & (3u << 17)) == (3u << 17);
    avx512_enabled = (lo & 0xE6u) == 0xE6u;
  }
  if (avx512_enabled && (eax1 & (1u << 5))) found.emplace_back("avx512bf16");
  if (avx512_enabled && (edx0 & (1u << 23))) found.emplace_back("avx512fp16");
  if (amx_enabled && (edx0 & (1u << 24))) found.emplace_back("amx-tile");
  if (amx_enabled && (edx0 & (1u << 22))) found.emplace_back("amx-bf16");
  if (amx_enabled && (eax1 & (1u << 21))) found.emplace_back("amx-fp16");
#endif
  return found;
}

}  // namespace diffcirc::cpu
