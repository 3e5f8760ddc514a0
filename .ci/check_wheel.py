"""Import every module of the installed duat_kernels (run from outside the source tree), check that
the C++ extension and its ISA variants are there, and print where it was imported from."""

import importlib
import pkgutil
import sys

import duat_kernels

if "site-packages" not in duat_kernels.__file__:
    sys.exit(f"duat_kernels was imported from {duat_kernels.__file__}, not from an installed wheel")
# every module except the `python -m duat_kernels` entry point, whose import runs the CLI
modules = [m.name for m in pkgutil.walk_packages(duat_kernels.__path__, "duat_kernels.") if not m.name.endswith("__main__")]
for name in modules:
    importlib.import_module(name)
from duat_kernels import cpp  # noqa: E402

if not cpp.is_available():
    sys.exit(f"the wheel has no C++ extension: {cpp.IMPORT_ERROR}")
print(f"imported {len(modules)} modules of duat_kernels {duat_kernels.__version__} from {duat_kernels.__file__}; "
      f"C++ kernels: {cpp.cpu_capability()} of {cpp._C.compiled_capabilities()}")
