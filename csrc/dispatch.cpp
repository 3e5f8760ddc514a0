// Choosing the ISA variant of the CPU kernels, once (see isa.h).
#include "isa.h"

#include <stdexcept>

namespace duat {

#define DUAT_DECLARE_VARIANT(ns) namespace ns { extern const IsaKernels kKernels; }
DUAT_DECLARE_VARIANT(baseline)
#if defined(DUAT_HAVE_AVX2)
DUAT_DECLARE_VARIANT(avx2)
#endif
#if defined(DUAT_HAVE_AVX512)
DUAT_DECLARE_VARIANT(avx512)
#endif
#if defined(DUAT_HAVE_AVX512_BF16)
DUAT_DECLARE_VARIANT(avx512_bf16)
#endif
#if defined(DUAT_HAVE_NATIVE)
DUAT_DECLARE_VARIANT(native)
#endif

const std::vector<const IsaKernels*>& compiled_variants() {
  static const std::vector<const IsaKernels*> variants = {
      &baseline::kKernels,
#if defined(DUAT_HAVE_AVX2)
      &avx2::kKernels,
#endif
#if defined(DUAT_HAVE_AVX512)
      &avx512::kKernels,
#endif
#if defined(DUAT_HAVE_AVX512_BF16)
      &avx512_bf16::kKernels,
#endif
#if defined(DUAT_HAVE_NATIVE)
      &native::kKernels,
#endif
  };
  return variants;
}

namespace {

const IsaKernels* best_supported() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
#endif
  const IsaKernels* best = compiled_variants().front();
  for (const IsaKernels* v : compiled_variants())
    if (v->cpu_supports()) best = v;
  return best;
}

const IsaKernels*& active_slot() {
  static const IsaKernels* slot = best_supported();
  return slot;
}

}  // namespace

const IsaKernels& active() { return *active_slot(); }

void set_capability(const std::string& name) {
  std::string known;
  for (const IsaKernels* v : compiled_variants()) {
    if (name == v->name) {
      if (!v->cpu_supports())
        throw std::invalid_argument("this CPU cannot run the '" + name + "' kernels");
      active_slot() = v;
      return;
    }
    known += std::string(known.empty() ? "" : ", ") + v->name;
  }
  throw std::invalid_argument("unknown CPU capability '" + name + "'; this build has: " + known);
}

}  // namespace duat
