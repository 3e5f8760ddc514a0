// The baseline (SSE2 on x86-64, NEON on aarch64) copy of the CPU kernels: csrc/kernels/* compiled with no ISA flags (see setup.py).
#define DUAT_ISA baseline

namespace duat {
namespace DUAT_ISA {
namespace {
bool cpu_supports() {
  return true;  // the architecture's baseline
}
}  // namespace
}  // namespace DUAT_ISA
}  // namespace duat

#include "variant.h"
