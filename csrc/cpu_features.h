// What the CPU kernels may use here. The SIMD code paths are compiled on x86-64 GCC/Clang builds with
// function-level target attributes (so the module still loads on older CPUs) and taken only where the CPU
// has their features; every kernel keeps a portable path for the rest.
#pragma once

#include <stdexcept>
#include <string>

#if defined(__GNUC__) && defined(__x86_64__)
#define PYBILAYER_X86_AVX2 1
#include <immintrin.h>
#define PYBILAYER_AVX2 __attribute__((target("avx2,fma")))
// AVX-512 Foundation only (16-float registers, masks, embedded broadcasts): what every AVX-512 CPU has.
#define PYBILAYER_AVX512 __attribute__((target("avx512f,avx2,fma")))
#endif

namespace pybilayer {

// A kernel's code path, each wider than the one before: portable C++, AVX2+FMA (8 floats a register),
// AVX-512F (16). A kernel without a path of some width takes its next narrower one.
enum class Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

// The widest path this CPU runs (the AVX-512 path is compiled with AVX2 and FMA too: it needs all three).
inline Isa best_isa() {
#ifdef PYBILAYER_X86_AVX2
  static const bool avx2_fma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  static const Isa best = !avx2_fma                            ? Isa::kPortable
                          : __builtin_cpu_supports("avx512f") ? Isa::kAvx512
                                                              : Isa::kAvx2;
  return best;
#else
  return Isa::kPortable;
#endif
}

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "portable";
  }
}

// "best" (best_isa), or the name of a path this CPU runs; anything else is an invalid_argument naming it.
inline Isa parse_isa(const std::string& name) {
  if (name == "best") return best_isa();
  for (Isa isa : {Isa::kPortable, Isa::kAvx2, Isa::kAvx512}) {
    if (name != isa_name(isa)) continue;
    if (isa > best_isa())
      throw std::invalid_argument("isa='" + name + "': this CPU's widest code path is '" + isa_name(best_isa()) + "'");
    return isa;
  }
  throw std::invalid_argument("isa='" + name + "': expected 'best', 'avx512', 'avx2' or 'portable'");
}

}  // namespace pybilayer
