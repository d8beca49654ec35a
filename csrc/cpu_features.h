// What the CPU kernels may use here: the AVX2+FMA code paths are compiled on x86-64 GCC/Clang builds (with
// function-level target attributes, so the module still loads on older CPUs) and taken only where the CPU
// has both; every kernel keeps a portable path for the rest.
#pragma once

#if defined(__GNUC__) && defined(__x86_64__)
#define PYBILAYER_X86_AVX2 1
#include <immintrin.h>
#define PYBILAYER_AVX2 __attribute__((target("avx2,fma")))
#endif

namespace pybilayer {

inline bool has_avx2_fma() {
#ifdef PYBILAYER_X86_AVX2
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

}  // namespace pybilayer
