// Instruction set of the CPU row kernels: what the CPU supports (detected once) and which one
// runs (the best supported, capped by DIFFCIRC_CPU_ISA or set_isa). The kernel asks for the
// active one per call; diffcirc._C reports it and lets tests and comparisons cap it.
#pragma once

#include <string>

namespace diffcirc::cpu {

// Ordered: each instruction set implies the ones below it.
enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// The instruction set the row kernels use now.
Isa active_isa();

// Name of the active instruction set: "avx512", "avx2" or "scalar".
std::string isa_name();

// Caps the instruction set at `name` (for tests and comparisons); returns the one now in use.
// Raises ValueError for an unknown name or one this CPU does not support.
std::string set_isa(const std::string& name);

}  // namespace diffcirc::cpu
