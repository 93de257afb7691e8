// Instruction set of the CPU row kernels: what the CPU supports (detected once) and which one
// runs (the best supported, capped by DIFFCIRC_CPU_ISA or set_isa). The kernel asks for the
// active one per call; diffcirc._C reports it and lets tests and comparisons cap it.
#pragma once

#include <string>
#include <vector>

namespace diffcirc::cpu {

// Ordered: each instruction set implies the ones below it.
// kAvx512Bf16: AVX-512 with AVX512-BF16 (one instruction packs float32 to bfloat16).
enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

// The instruction set the row kernels use now.
Isa active_isa();

// Name of the active instruction set: "avx512bf16", "avx512", "avx2" or "scalar".
std::string isa_name();

// Caps the instruction set at `name` (for tests and comparisons); returns the one now in use.
// Raises ValueError for an unknown name or one this CPU does not support.
std::string set_isa(const std::string& name);

}  // namespace diffcirc::cpu

namespace diffcirc::cpu {

// The CPU's extensions that decide bfloat16 / float16 speed, of avx512bf16, avx512fp16, amx-tile,
// amx-bf16 and amx-fp16: those it has (for AMX: and the OS has enabled, XCR0 bits 17-18). The
// kernel's bfloat16 GEMMs run on AMX tiles where oneDNN finds them (blas.h).
std::vector<std::string> cpu_features();

}  // namespace diffcirc::cpu
