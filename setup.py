"""Build of the C++ extension duat_kernels._C (pybind11 + OpenMP, no libtorch).

The kernels in csrc/kernels/ are compiled once per instruction set, each copy through its own
translation unit csrc/isa/<name>.cpp with that ISA's flags, and the best copy the running CPU
supports is chosen at import (csrc/dispatch.cpp; DUAT_CPU_CAPABILITY forces a lower one). So one
wheel runs on any CPU of the architecture and is fast on each:

    x86-64:  baseline (SSE2), avx2 (AVX2 + FMA + F16C), avx512 (AVX-512 F/BW/VL/DQ),
             avx512_bf16 (avx512 + AVX512_BF16)
    aarch64: baseline (NEON)

No -march=native by default; DUAT_NATIVE=1 adds a "native" copy built for the build machine's CPU
(preferred when the running CPU has its features). The TUs compile in parallel (pybind11's
ParallelCompile; DUAT_BUILD_JOBS sets the number of jobs).
"""
import os
import platform

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext, has_flag
from setuptools import setup

X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
NATIVE = os.environ.get("DUAT_NATIVE", "") not in ("", "0")

# ISA translation unit -> (extra compiler flags, macro telling dispatch.cpp it exists)
ISA_VARIANTS = {"baseline": ([], None)}
if X86:
    ISA_VARIANTS["avx2"] = (["-mavx2", "-mfma", "-mf16c"], "DUAT_HAVE_AVX2")
    AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"]
    ISA_VARIANTS["avx512"] = (AVX512, "DUAT_HAVE_AVX512")
    # AVX-512 plus the bfloat16 conversion instruction (Zen 4 and later, Sapphire Rapids and later):
    # bf16 output rounds in one instruction instead of seven integer operations per 32 values
    # (docs/design.md, "The bfloat16 store path").
    ISA_VARIANTS["avx512_bf16"] = (AVX512 + ["-mavx512bf16"], "DUAT_HAVE_AVX512_BF16")
if NATIVE:
    ISA_VARIANTS["native"] = (["-march=native"], "DUAT_HAVE_NATIVE")


def _isa_of(source: str) -> str | None:
    parts = source.replace("\\", "/").split("/")
    return parts[-1][:-4] if len(parts) >= 2 and parts[-2] == "isa" else None


class BuildExt(build_ext):
    def build_extensions(self):
        compiler = self.compiler
        # -ffp-contract=off: the kernels decide where multiply-adds fuse (bitwise-equal tiles).
        extra_compile, extra_link = ["-O3", "-fno-math-errno", "-ffp-contract=off", "-fvisibility=hidden"], []
        if has_flag(compiler, "-fopenmp"):
            extra_compile.append("-fopenmp")
            extra_link.append("-fopenmp")
        else:
            print("duat_kernels: the compiler has no OpenMP; the C++ backend will run on one thread")
        for ext in self.extensions:
            ext.extra_compile_args += extra_compile
            ext.extra_link_args += extra_link
            ext.define_macros += [(macro, "1") for _, macro in ISA_VARIANTS.values() if macro]

        original = compiler._compile

        def compile_with_isa_flags(obj, src, ext, cc_args, extra_postargs, pp_opts):
            isa = _isa_of(src)
            flags = ISA_VARIANTS[isa][0] if isa else []
            original(obj, src, ext, cc_args, list(extra_postargs) + flags, pp_opts)

        compiler._compile = compile_with_isa_flags
        super().build_extensions()


ParallelCompile("DUAT_BUILD_JOBS", default=0).install()

setup(
    ext_modules=[
        Pybind11Extension(
            "duat_kernels._C",
            sources=["csrc/bindings.cpp", "csrc/dispatch.cpp", "csrc/attention_norms.cpp", "csrc/qk_attention_norms.cpp",
                     "csrc/output_cache.cpp"] + [f"csrc/isa/{name}.cpp" for name in ISA_VARIANTS],
            include_dirs=["csrc"],
            depends=["csrc/isa.h", "csrc/isa/variant.h", "csrc/kron_sum.h", "csrc/attention_norms.h", "csrc/qk_attention_norms.h",
                     "csrc/output_cache.h", "csrc/kernels/simd.h", "csrc/kernels/kron_sum.cpp", "csrc/kernels/fma_peak.cpp",
                     "csrc/kernels/gram_rows.cpp", "csrc/kernels/qk_rows.cpp", "csrc/kernels/micro_rate.cpp"],
            cxx_std=17,
        )
    ],
    cmdclass={"build_ext": BuildExt},
)
