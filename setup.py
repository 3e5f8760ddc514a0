"""Build of the C++ extension duat_kernels._C (pybind11 + OpenMP, no libtorch).

Flags: -O3, OpenMP when the compiler has it, and -march=native so that the vector-extension
kernels become AVX-512/AVX2 code on the machine that builds them. DUAT_PORTABLE=1 (or a compiler
without -march=native) gives a portable build; the kernels then lower to the baseline ISA.
"""
import os

from pybind11.setup_helpers import Pybind11Extension, build_ext, has_flag
from setuptools import setup


class BuildExt(build_ext):
    def build_extensions(self):
        compiler = self.compiler
        extra_compile, extra_link = ["-O3", "-fno-math-errno"], []
        if os.environ.get("DUAT_PORTABLE", "") not in ("", "0") or not has_flag(compiler, "-march=native"):
            print("duat_kernels: portable build (no -march=native)")
        else:
            extra_compile.append("-march=native")
        if has_flag(compiler, "-fopenmp"):
            extra_compile.append("-fopenmp")
            extra_link.append("-fopenmp")
        else:
            print("duat_kernels: the compiler has no OpenMP; the C++ backend will run on one thread")
        for ext in self.extensions:
            ext.extra_compile_args += extra_compile
            ext.extra_link_args += extra_link
        super().build_extensions()


setup(
    ext_modules=[
        Pybind11Extension(
            "duat_kernels._C",
            sources=["csrc/bindings.cpp", "csrc/kron_sum.cpp", "csrc/fma_peak.cpp", "csrc/attention_norms.cpp"],
            include_dirs=["csrc"],
            cxx_std=17,
        )
    ],
    cmdclass={"build_ext": BuildExt},
)
