// pybind11 boundary of the C++ backend: takes buffers (NumPy views of torch tensors, no libtorch),
// checks every shape, format and size, then releases the GIL and calls the kernel.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#include "isa.h"
#include "attention_norms.h"
#include "qk_attention_norms.h"
#include "kron_sum.h"
#include "output_cache.h"
#include <pybind11/numpy.h>

namespace py = pybind11;

namespace {

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument("duat_kernels._C: " + msg); }

// The most threads a kernel call takes: libgomp fails to start tens of thousands (num_threads=100000
// segfaulted the process), and far fewer than that only contend for the CPUs.
constexpr int kMaxThreads = 4096;

void check_threads(int64_t num_threads) {
  if (num_threads < 1 || num_threads > kMaxThreads)
    fail("num_threads must be in [1, " + std::to_string(kMaxThreads) + "], got " + std::to_string(num_threads));
}

// Numbers and flags as Python passes them, each checked by name. pybind11's own casters took True as the int 1
// (micro_kernel_gflops(h=True), kron_sum(row0=True) ran), True as the float 1.0 (scale=True) and any number as
// a bool (causal=2), silently; a float or an int past int64 got its "incompatible function arguments" list.
bool is_bool(const py::handle& obj) {
  const char* type = Py_TYPE(obj.ptr())->tp_name;
  return PyBool_Check(obj.ptr()) || std::strcmp(type, "numpy.bool") == 0 || std::strcmp(type, "numpy.bool_") == 0;
}

std::string describe(const py::handle& obj) {
  return std::string(Py_TYPE(obj.ptr())->tp_name) + " " + py::repr(obj).cast<std::string>();
}

// An int (or an integer with __index__, such as NumPy's), not a bool, within int64.
int64_t int_arg(const py::handle& obj, const std::string& name) {
  if (is_bool(obj) || !PyIndex_Check(obj.ptr()))
    throw py::type_error("duat_kernels._C: " + name + " must be an int, got " + describe(obj));
  const py::object index = py::reinterpret_steal<py::object>(PyNumber_Index(obj.ptr()));
  if (!index) throw py::error_already_set();
  int overflow = 0;
  const long long value = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
  if (overflow) fail(name + " is outside the int64 range, got " + describe(obj));
  return value;
}

int threads_arg(const py::handle& obj, const std::string& function) {
  const int64_t n = int_arg(obj, function + ": num_threads");
  check_threads(n);
  return static_cast<int>(n);
}

// True or False (NumPy's bools too), not a number or another object with a truth value.
bool flag_arg(const py::handle& obj, const std::string& name) {
  if (!is_bool(obj)) throw py::type_error("duat_kernels._C: " + name + " must be True or False, got " + describe(obj));
  return PyObject_IsTrue(obj.ptr()) == 1;
}

// A str (out_dtype): True or None got pybind11's "incompatible function arguments" list.
std::string str_arg(const py::handle& obj, const std::string& name) {
  if (!PyUnicode_Check(obj.ptr()))
    throw py::type_error("duat_kernels._C: " + name + " must be a str (float32, float64, float16 or bfloat16), got " +
                         describe(obj));
  return obj.cast<std::string>();
}

// A real number (int, float, NumPy's), not a bool.
double real_arg(const py::handle& obj, const std::string& name) {
  PyNumberMethods* number = Py_TYPE(obj.ptr())->tp_as_number;
  if (is_bool(obj) || !(PyIndex_Check(obj.ptr()) || (number && number->nb_float)) || PyComplex_Check(obj.ptr()))
    throw py::type_error("duat_kernels._C: " + name + " must be a real number, got " + describe(obj));
  const double value = PyFloat_AsDouble(obj.ptr());
  if (value == -1.0 && PyErr_Occurred()) throw py::error_already_set();
  return value;
}

// A buffer the kernel writes: a read-only one was refused with NumPy's "buffer source array is read-only",
// which named no argument.
py::buffer_info writable(const py::buffer& buf, const std::string& name) {
  try {
    return buf.request(/*writable=*/true);
  } catch (py::error_already_set& exc) {
    fail(name + " must be a writable array (the kernel writes it): " + exc.what());
  }
}

int64_t checked_mul(int64_t a, int64_t b, const char* what) {
  int64_t r;
  if (__builtin_mul_overflow(a, b, &r)) fail(std::string(what) + " overflows int64");
  return r;
}

std::string shape_str(const py::buffer_info& b) {
  std::string s = "(";
  for (size_t i = 0; i < b.shape.size(); ++i) s += (i ? ", " : "") + std::to_string(b.shape[i]);
  return s + ")";
}

void require_c_contiguous(const py::buffer_info& b, const char* name) {
  int64_t expected = b.itemsize;
  for (int64_t d = b.ndim - 1; d >= 0; --d) {
    if (b.shape[d] != 1 && b.strides[d] != expected)
      fail(std::string(name) + " must be C-contiguous");
    expected *= b.shape[d];
  }
}

// What a buffer format that is not the native one means: NumPy gives a view that is not aligned to its item size
// (a float32 view at an odd byte offset) the format '=f', and one in the other byte order '>f'; both read as
// "got format '=f'" for what is a float32.
std::string format_str(const py::buffer_info& b) {
  std::string hint;
  if (b.format.size() == 2 && b.format[0] == '=')
    hint = " (an array not aligned to its item size: pass a copy, a.copy())";
  else if (b.format.size() == 2 && std::strchr("<>!", b.format[0]) != nullptr)
    hint = " (an array in a byte order that is not this machine's: pass a copy in native order, "
           "a.astype(a.dtype.newbyteorder('=')))";
  return "'" + b.format + "'" + hint;
}

char scalar_format(const py::buffer_info& b, const char* name) {
  if (b.format == py::format_descriptor<float>::format()) return 'f';
  if (b.format == py::format_descriptor<double>::format()) return 'd';
  fail(std::string(name) + " must hold float32 or float64, got format " + format_str(b));
}

duat::OutType parse_out_type(const std::string& s) {
  if (s == "float32") return duat::OutType::kFloat32;
  if (s == "float64") return duat::OutType::kFloat64;
  if (s == "float16") return duat::OutType::kFloat16;
  if (s == "bfloat16") return duat::OutType::kBFloat16;
  fail("out_dtype must be one of float32, float64, float16, bfloat16, got '" + s + "'");
}

int64_t itemsize_of(duat::OutType t) {
  switch (t) {
    case duat::OutType::kFloat32: return 4;
    case duat::OutType::kFloat64: return 8;
    default: return 2;
  }
}

// A fresh output pays one page fault per 4 KiB page on first touch (several times the cost of the
// writes); asking for transparent huge pages on a large buffer makes that one fault per 2 MiB. The
// threads that write the rows then fault their pages in parallel. Harmless on a reused buffer.
void advise_huge_pages(void* ptr, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (bytes < int64_t(8) << 20) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(ptr) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(ptr) + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // advice only
#else
  (void)ptr;
  (void)bytes;
#endif
}

// The stride of axis `axis` in elements (buffers give bytes); negative or fractional strides are refused.
int64_t element_stride(const py::buffer_info& b, int axis, const char* name) {
  const int64_t bytes = b.strides[axis];
  if (bytes < 0 || bytes % b.itemsize != 0)
    fail(std::string(name) + " has stride " + std::to_string(bytes) + " bytes on axis " + std::to_string(axis) +
         "; strides must be non-negative multiples of the item size");
  return bytes / b.itemsize;
}

// Whether most pages of a large buffer were never touched (not resident): a fresh allocation whose
// pages the kernel will zero on first touch.
bool untouched(void* ptr, int64_t bytes) {
#if defined(__linux__)
  if (bytes < int64_t(8) << 20) return false;
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(ptr) + page - 1) & ~(page - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(ptr) + static_cast<uintptr_t>(bytes)) & ~(page - 1);
  if (end <= begin) return false;
  std::vector<unsigned char> resident((end - begin) / page);
  if (mincore(reinterpret_cast<void*>(begin), end - begin, resident.data()) != 0) return false;
  size_t count = 0;
  for (unsigned char v : resident) count += v & 1;
  return count * 2 < resident.size();
#else
  (void)ptr;
  (void)bytes;
  return false;
#endif
}

// The output checks shared by the kron_sum entry points: 2-D, C-contiguous, an item size matching
// out_dtype, float64 exactly when the factors are float64.
duat::OutType check_output(const py::buffer_info& o, const std::string& out_dtype, char factor_format) {
  if (o.ndim != 2) fail("out must be 2-D (rows, cols), got shape " + shape_str(o));
  require_c_contiguous(o, "out");
  const duat::OutType ot = parse_out_type(out_dtype);
  if (o.itemsize != itemsize_of(ot))
    fail("out has itemsize " + std::to_string(o.itemsize) + " but out_dtype is " + out_dtype);
  if ((ot == duat::OutType::kFloat64) != (factor_format == 'd'))
    fail("float64 output needs float64 factors and other outputs float32 factors");
  return ot;
}

// L (h, P, S) read through its strides: shape and strides into the problem.
void set_left(duat::KronSumProblem& pb, const py::buffer_info& l) {
  if (l.ndim != 3) fail("lt must be 3-D (h, P, S), got shape " + shape_str(l));
  pb.h = l.shape[0];
  pb.P = l.shape[1];
  pb.S = l.shape[2];
  pb.l_h = element_stride(l, 0, "lt");
  pb.l_p = element_stride(l, 1, "lt");
  pb.l_s = element_stride(l, 2, "lt");
}

// Releases the GIL and runs the problem on out (after the checks; pb.h > 0, a non-empty tile).
void launch(duat::KronSumProblem pb, const void* lp, const void* rp, const py::buffer_info& o, duat::OutType ot,
            char factor_format, int num_threads) {
  void* op = o.ptr;
  const duat::IsaKernels& kernels = duat::active();
  const int64_t out_bytes = checked_mul(checked_mul(pb.rows, pb.cols, "rows*cols"), o.itemsize, "the output bytes");
  py::gil_scoped_release release;
  advise_huge_pages(op, out_bytes);
  pb.fresh = untouched(op, out_bytes);
  if (factor_format == 'd')
    kernels.kron_sum_f64(static_cast<const double*>(lp), static_cast<const double*>(rp), static_cast<double*>(op), pb,
                         num_threads);
  else
    kernels.kron_sum_f32(static_cast<const float*>(lp), static_cast<const float*>(rp), op, ot, pb, num_threads);
}

// The tile [row0, row0 + rows) x [col0, col0 + cols) of W (P·Q x S·T), rows x cols the shape of out:
// into the problem after checking that it lies inside W and that W's entries can be counted in int64.
void set_tile(duat::KronSumProblem& pb, const py::buffer_info& o, int64_t row0, int64_t col0) {
  pb.rows = o.shape[0];
  pb.cols = o.shape[1];
  pb.row0 = row0;
  pb.col0 = col0;
  const int64_t total_rows = checked_mul(pb.P, pb.Q, "P*Q");
  const int64_t total_cols = checked_mul(pb.S, pb.T, "S*T");
  checked_mul(total_rows, total_cols, "the number of entries of W");
  if (row0 < 0 || col0 < 0 || row0 > total_rows - pb.rows || col0 > total_cols - pb.cols)
    fail("tile rows [" + std::to_string(row0) + ", " + std::to_string(row0 + pb.rows) + ") x cols [" +
         std::to_string(col0) + ", " + std::to_string(col0 + pb.cols) + ") exceeds W of shape (" +
         std::to_string(total_rows) + ", " + std::to_string(total_cols) + ")");
}

void kron_sum(py::buffer lt, py::buffer rt, py::buffer out, py::handle out_dtype_arg,
              py::handle row0_arg, py::handle col0_arg, py::handle threads) {
  const std::string out_dtype = str_arg(out_dtype_arg, "kron_sum: out_dtype");
  const int num_threads = threads_arg(threads, "kron_sum");
  const int64_t row0 = int_arg(row0_arg, "kron_sum: row0"), col0 = int_arg(col0_arg, "kron_sum: col0");
  py::buffer_info l = lt.request(), r = rt.request(), o = writable(out, "out");
  duat::KronSumProblem pb;
  set_left(pb, l);
  if (r.ndim != 3) fail("rt must be 3-D (h, Q, T), got shape " + shape_str(r));
  const char lf = scalar_format(l, "lt"), rf = scalar_format(r, "rt");
  const int64_t rs[3] = {element_stride(r, 0, "rt"), element_stride(r, 1, "rt"), element_stride(r, 2, "rt")};
  if (r.shape[2] > 1 && rs[2] != 1) fail("rt must be contiguous along its last axis (T)");
  if (lf != rf) fail("lt and rt must have the same dtype");
  const duat::OutType ot = check_output(o, out_dtype, lf);
  pb.Q = r.shape[1];
  pb.T = r.shape[2];
  if (r.shape[0] != pb.h)
    fail("lt has " + std::to_string(pb.h) + " heads but rt has " + std::to_string(r.shape[0]));
  pb.r_h = rs[0];
  pb.r_q = rs[1];
  set_tile(pb, o, row0, col0);
  if (pb.h <= 0 || pb.rows == 0 || pb.cols == 0) {
    if (pb.h <= 0 && pb.rows > 0 && pb.cols > 0) fail("h must be positive");
    return;
  }
  launch(pb, l.ptr, r.ptr, o, ot, lf, num_threads);
}

// wo (M_out, h·d) and wv (h_kv·d, M_in), C-contiguous, in the factor format f: the OV problem.
duat::OvProblem check_weights(const py::buffer_info& wo, const py::buffer_info& wv, int64_t heads, int64_t kv_heads,
                              char f) {
  if (wo.ndim != 2) fail("wo must be 2-D (M_out, h*d), got shape " + shape_str(wo));
  if (wv.ndim != 2) fail("wv must be 2-D (h_kv*d, M_in), got shape " + shape_str(wv));
  require_c_contiguous(wo, "wo");
  require_c_contiguous(wv, "wv");
  if (scalar_format(wo, "wo") != f || scalar_format(wv, "wv") != f) fail("lt/out, wo and wv must have one dtype");
  if (heads <= 0 || kv_heads <= 0 || heads % kv_heads != 0)
    fail("heads (" + std::to_string(heads) + ") must be a positive multiple of kv_heads (" + std::to_string(kv_heads) +
         ")");
  if (wo.shape[1] % heads != 0)
    fail("wo has " + std::to_string(wo.shape[1]) + " columns, not a multiple of heads = " + std::to_string(heads));
  duat::OvProblem pb;
  pb.m_out = wo.shape[0];
  pb.m_in = wv.shape[1];
  pb.heads = heads;
  pb.group = heads / kv_heads;
  pb.d = wo.shape[1] / heads;
  pb.ldo = wo.shape[1];
  if (wv.shape[0] != kv_heads * pb.d)
    fail("wv has " + std::to_string(wv.shape[0]) + " rows, expected kv_heads * d = " + std::to_string(kv_heads * pb.d));
  return pb;
}

// A tile of W = sum_i L_i (x) OV_i with OV given by its factors (token layout; never written):
// lt = L (h, P, S) through its strides (a part of A), wo (Q, h*d) and wv (h_kv*d, T) C-contiguous (the
// rows and columns of the weights the tile touches), out (rows, cols) at [row0, col0) of W.
void kron_sum_factored(py::buffer lt, py::buffer wo_buf, py::buffer wv_buf, py::buffer out, py::handle out_dtype_arg,
                       py::handle kv_heads_arg, py::handle row0_arg, py::handle col0_arg, py::handle threads) {
  const std::string out_dtype = str_arg(out_dtype_arg, "kron_sum_factored: out_dtype");
  const int num_threads = threads_arg(threads, "kron_sum_factored");
  const int64_t kv_heads = int_arg(kv_heads_arg, "kron_sum_factored: kv_heads");
  const int64_t row0 = int_arg(row0_arg, "kron_sum_factored: row0"), col0 = int_arg(col0_arg, "kron_sum_factored: col0");
  py::buffer_info l = lt.request(), wo = wo_buf.request(), wv = wv_buf.request(), o = writable(out, "out");
  duat::KronSumProblem pb;
  set_left(pb, l);
  const char f = scalar_format(l, "lt");
  const duat::OutType ot = check_output(o, out_dtype, f);
  const duat::OvProblem ov = check_weights(wo, wv, pb.h, kv_heads, f);
  if (ov.d == 0)
    fail("wo and wv have head size d = 0: OV is zero, write the tile with kron_sum and a zero OV (the factored "
         "kernel needs d >= 1)");
  pb.Q = ov.m_out;
  pb.T = ov.m_in;
  pb.d = ov.d;
  pb.group = ov.group;
  pb.ldo = ov.ldo;
  set_tile(pb, o, row0, col0);
  pb.r_h = pb.r_q = 0;
  pb.wo = wo.ptr;
  pb.wv = wv.ptr;
  if (pb.rows == 0 || pb.cols == 0) return;
  launch(pb, l.ptr, nullptr, o, ot, f, num_threads);
}

// OV (M_out, h, M_in) of wo (M_out, h·d) and wv (h_kv·d, M_in), all C-contiguous, one dtype.
void ov_slabs(py::buffer wo_buf, py::buffer wv_buf, py::buffer out_buf, py::handle heads_arg, py::handle kv_heads_arg,
              py::handle threads) {
  const int num_threads = threads_arg(threads, "ov_slabs");
  const int64_t heads = int_arg(heads_arg, "ov_slabs: heads"), kv_heads = int_arg(kv_heads_arg, "ov_slabs: kv_heads");
  py::buffer_info wo = wo_buf.request(), wv = wv_buf.request(), o = writable(out_buf, "out");
  if (o.ndim != 3) fail("out must be 3-D (M_out, h, M_in), got shape " + shape_str(o));
  require_c_contiguous(o, "out");
  const char f = scalar_format(o, "out");
  const duat::OvProblem pb = check_weights(wo, wv, heads, kv_heads, f);
  if (o.shape[0] != pb.m_out || o.shape[1] != heads || o.shape[2] != pb.m_in)
    fail("out has shape " + shape_str(o) + ", expected (" + std::to_string(pb.m_out) + ", " + std::to_string(heads) +
         ", " + std::to_string(pb.m_in) + ")");
  checked_mul(checked_mul(pb.m_out, heads, "M_out*h"), pb.m_in, "the number of entries of OV");
  if (pb.m_out == 0 || pb.m_in == 0) return;
  if (pb.d == 0) {  // head size 0: every OV_i is an empty sum (the kernel blocks its columns by d)
    std::memset(o.ptr, 0, static_cast<size_t>(pb.m_out * heads * pb.m_in) * static_cast<size_t>(o.itemsize));
    return;
  }
  const void* wop = wo.ptr;
  const void* wvp = wv.ptr;
  void* op = o.ptr;
  const duat::IsaKernels& kernels = duat::active();
  py::gil_scoped_release release;
  if (f == 'd')
    kernels.ov_slabs_f64(static_cast<const double*>(wop), static_cast<const double*>(wvp), static_cast<double*>(op), pb,
                         num_threads);
  else
    kernels.ov_slabs_f32(static_cast<const float*>(wop), static_cast<const float*>(wvp), static_cast<float*>(op), pb,
                         num_threads);
}

[[noreturn]] void fail_norms(const std::string& msg) {
  throw std::invalid_argument("duat_kernels._C.gram_norms: " + msg);
}

// a (h, rows, cols) float32 and c (h, h) float32, C-contiguous: the problem, or an error naming the buffer.
duat::GramNormsProblem check_gram_inputs(const py::buffer_info& a, const py::buffer_info& c) {
  if (a.ndim != 3) fail_norms("a must be 3-D (h, rows, cols), got shape " + shape_str(a));
  if (c.ndim != 2 || c.shape[0] != a.shape[0] || c.shape[1] != a.shape[0])
    fail_norms("c must be (h, h) with h = " + std::to_string(a.shape[0]) + ", got shape " + shape_str(c));
  for (const auto* b : {&a, &c}) {
    const char* name = b == &a ? "a" : "c";
    if (b->format != py::format_descriptor<float>::format())
      fail_norms(std::string(name) + " must hold float32, got format " + format_str(*b));
    int64_t expected = b->itemsize;
    for (int64_t d = b->ndim - 1; d >= 0; --d) {
      if (b->shape[d] != 1 && b->strides[d] != expected) fail_norms(std::string(name) + " must be C-contiguous");
      expected *= b->shape[d];
    }
  }
  duat::GramNormsProblem pb{a.shape[0], a.shape[1], a.shape[2]};
  checked_mul(checked_mul(pb.h, pb.rows, "h*rows"), pb.cols, "h*rows*cols");
  if (pb.h <= 0) fail_norms("h must be positive");
  return pb;
}

void require_shape(const py::buffer_info& b, const char* name, const char* fmt, std::initializer_list<int64_t> shape) {
  if (b.format != fmt) fail_norms(std::string(name) + " has format '" + b.format + "', expected '" + fmt + "'");
  if (b.ndim != static_cast<int64_t>(shape.size())) fail_norms(std::string(name) + " has shape " + shape_str(b));
  int64_t d = 0, expected = b.itemsize;
  for (int64_t s : shape)
    if (b.shape[d++] != s) fail_norms(std::string(name) + " has shape " + shape_str(b));
  for (int64_t k = b.ndim - 1; k >= 0; --k) {
    if (b.shape[k] != 1 && b.strides[k] != expected) fail_norms(std::string(name) + " must be C-contiguous");
    expected *= b.shape[k];
  }
}

void gram_squared_norms(py::buffer a_buf, py::buffer c_buf, py::buffer out_buf, py::handle threads, py::handle root_arg) {
  const int num_threads = threads_arg(threads, "gram_squared_norms");
  const bool root = flag_arg(root_arg, "gram_squared_norms: root");
  py::buffer_info a = a_buf.request(), c = c_buf.request(), o = writable(out_buf, "out");
  const duat::GramNormsProblem pb = check_gram_inputs(a, c);
  require_shape(o, "out", py::format_descriptor<float>::format().c_str(), {pb.rows, pb.cols});
  if (pb.rows == 0 || pb.cols == 0) return;
  const float *ap = static_cast<const float*>(a.ptr), *cp = static_cast<const float*>(c.ptr);
  float* op = static_cast<float*>(o.ptr);
  py::gil_scoped_release release;
  duat::gram_squared_norms(ap, cp, op, pb, num_threads, root);
}

void gram_grid_norms(py::buffer a_buf, py::buffer c_buf, py::buffer row_bin_buf, py::buffer col_bin_buf,
                     py::buffer out_buf, py::handle threads) {
  const int num_threads = threads_arg(threads, "gram_grid_norms");
  py::buffer_info a = a_buf.request(), c = c_buf.request(), rb = row_bin_buf.request(), cb = col_bin_buf.request(),
                  o = writable(out_buf, "out");
  const duat::GramNormsProblem pb = check_gram_inputs(a, c);
  const std::string i64 = py::format_descriptor<int64_t>::format();
  if (rb.format != i64 && !(rb.format == "l" && rb.itemsize == 8)) fail_norms("row_bin must hold int64");
  if (cb.format != i64 && !(cb.format == "l" && cb.itemsize == 8)) fail_norms("col_bin must hold int64");
  require_shape(rb, "row_bin", rb.format.c_str(), {pb.rows});
  require_shape(cb, "col_bin", cb.format.c_str(), {pb.cols});
  if (o.ndim != 2) fail_norms("out must be 2-D (out_rows, out_cols), got shape " + shape_str(o));
  require_shape(o, "out", py::format_descriptor<double>::format().c_str(), {o.shape[0], o.shape[1]});
  const int64_t *rp = static_cast<const int64_t*>(rb.ptr), *cp_bin = static_cast<const int64_t*>(cb.ptr);
  for (int64_t r = 0; r < pb.rows; ++r)
    if (rp[r] < 0 || rp[r] >= o.shape[0]) fail_norms("row_bin[" + std::to_string(r) + "] is out of range");
  for (int64_t m = 0; m < pb.cols; ++m)
    if (cp_bin[m] < 0 || cp_bin[m] >= o.shape[1]) fail_norms("col_bin[" + std::to_string(m) + "] is out of range");
  if (pb.rows == 0 || pb.cols == 0) return;
  const float *ap = static_cast<const float*>(a.ptr), *cp = static_cast<const float*>(c.ptr);
  double* op = static_cast<double*>(o.ptr);
  const int64_t out_rows = o.shape[0], out_cols = o.shape[1];
  py::gil_scoped_release release;
  duat::gram_grid_norms(ap, cp, rp, cp_bin, op, out_rows, out_cols, pb, num_threads);
}

[[noreturn]] void fail_qk(const std::string& msg) { throw std::invalid_argument("duat_kernels._C.qk_gram_norms: " + msg); }

void require_f32_c(const py::buffer_info& b, const char* name, int64_t ndim) {
  if (b.format != py::format_descriptor<float>::format())
    fail_qk(std::string(name) + " must hold float32, got format " + format_str(b));
  if (b.ndim != ndim) fail_qk(std::string(name) + " must be " + std::to_string(ndim) + "-D, got shape " + shape_str(b));
  int64_t expected = b.itemsize;
  for (int64_t d = b.ndim - 1; d >= 0; --d) {
    if (b.shape[d] != 1 && b.strides[d] != expected) fail_qk(std::string(name) + " must be C-contiguous");
    expected *= b.shape[d];
  }
}

// The problem of q (B, h, N, d), k (B, h_kv, N_k, d), c (h, h) and the options; key_mask (B, N_k) bytes or None.
// N_k != N (cross-attention) only without causal mask and window.
struct QkInputs {
  duat::QkNormsProblem pb;
  const float *q, *k, *c;
  const uint8_t* key_mask;
};

// The options of the q/k kernels, converted by name (real_arg, flag_arg, int_arg).
struct QkOptions {
  double scale, softcap;
  bool causal;
  int64_t window;
  int num_threads;
};

QkOptions qk_options(const std::string& function, const py::handle& scale, const py::handle& softcap,
                     const py::handle& causal, const py::handle& window, const py::handle& threads) {
  return {real_arg(scale, function + ": scale"), real_arg(softcap, function + ": softcap"),
          flag_arg(causal, function + ": causal"), int_arg(window, function + ": window"),
          threads_arg(threads, function)};
}

QkInputs check_qk_inputs(const py::buffer_info& q, const py::buffer_info& k, const py::object& key_mask_obj,
                         py::buffer_info& mask_info, const py::buffer_info* c, const QkOptions& opt) {
  const double scale = opt.scale, softcap = opt.softcap;
  const bool causal = opt.causal;
  const int64_t window = opt.window;
  require_f32_c(q, "q", 4);
  require_f32_c(k, "k", 4);
  if (c) require_f32_c(*c, "c", 2);
  duat::QkNormsProblem pb{q.shape[0], q.shape[1], k.shape[1], q.shape[2], q.shape[3], static_cast<float>(scale),
                          static_cast<float>(softcap), causal, window, k.shape[2]};
  if (k.shape[0] != pb.batch || k.shape[3] != pb.d)
    fail_qk("k must be (B, h_kv, N_k, d) = (" + std::to_string(pb.batch) + ", h_kv, N_k, " + std::to_string(pb.d) +
            ") to match q " + shape_str(q) + ", got " + shape_str(k));
  if (pb.n_k != pb.n && (causal || window != 0))
    fail_qk("causal and window need k of N = " + std::to_string(pb.n) + " keys (self-attention), got k " + shape_str(k));
  if (pb.n_k == 0 && pb.n != 0 && pb.batch != 0) fail_qk("k must have at least one key, got " + shape_str(k));
  if (pb.h <= 0 || pb.h_kv <= 0 || pb.h % pb.h_kv != 0)
    fail_qk("the heads of q (" + std::to_string(pb.h) + ") must be a positive multiple of those of k (" +
            std::to_string(pb.h_kv) + ")");
  if (pb.d <= 0) fail_qk("the head dimension d must be positive, got " + std::to_string(pb.d));
  if (c && (c->shape[0] != pb.h || c->shape[1] != pb.h))
    fail_qk("c must be (h, h) with h = " + std::to_string(pb.h) + ", got shape " + shape_str(*c));
  if (!std::isfinite(scale)) fail_qk("scale must be finite, got " + std::to_string(scale));
  if (!(softcap >= 0.0) || !std::isfinite(softcap)) fail_qk("softcap must be finite and >= 0 (0 = none), got " + std::to_string(softcap));
  if (window < 0) fail_qk("window must be >= 0 (0 = none), got " + std::to_string(window));
  checked_mul(checked_mul(checked_mul(pb.batch, pb.h, "B*h"), pb.n, "B*h*N"), pb.d, "B*h*N*d");
  checked_mul(checked_mul(checked_mul(pb.batch, pb.h_kv, "B*h_kv"), pb.n_k, "B*h_kv*N_k"), pb.d, "B*h_kv*N_k*d");
  checked_mul(checked_mul(checked_mul(pb.h, pb.n_k, "h*N_k"), 96, "h*N_k*rows"), 4, "the logits buffer bytes");
  checked_mul(checked_mul(pb.batch, pb.n, "B*N"), pb.n_k, "B*N*N_k");
  const uint8_t* mask = nullptr;
  if (!key_mask_obj.is_none()) {
    if (!py::isinstance<py::buffer>(key_mask_obj))  // pybind11's "Object of type 'list' is not an instance of 'buffer'"
      throw py::type_error("duat_kernels._C.qk_gram_norms: key_mask must be None or a (B, N_k) bool or uint8 array, got " +
                           describe(key_mask_obj));
    mask_info = py::cast<py::buffer>(key_mask_obj).request();
    if (mask_info.itemsize != 1 || (mask_info.format != "?" && mask_info.format != "B" && mask_info.format != "b"))
      fail_qk("key_mask must hold bool or uint8, got format '" + mask_info.format + "'");
    if (mask_info.ndim != 2 || mask_info.shape[0] != pb.batch || mask_info.shape[1] != pb.n_k)
      fail_qk("key_mask must be (B, N_k) = (" + std::to_string(pb.batch) + ", " + std::to_string(pb.n_k) + "), got shape " +
              shape_str(mask_info));
    if ((mask_info.shape[1] != 1 && mask_info.strides[1] != 1) ||
        (mask_info.shape[0] != 1 && mask_info.strides[0] != pb.n_k))
      fail_qk("key_mask must be C-contiguous");
    mask = static_cast<const uint8_t*>(mask_info.ptr);
  }
  return {pb, static_cast<const float*>(q.ptr), static_cast<const float*>(k.ptr),
          c ? static_cast<const float*>(c->ptr) : nullptr, mask};
}

bool qk_gram_squared_norms(py::buffer q_buf, py::buffer k_buf, py::object key_mask, py::buffer c_buf, py::buffer out_buf,
                           py::handle scale, py::handle softcap, py::handle causal, py::handle window, py::handle threads,
                           py::handle tiny_roots_arg) {
  const QkOptions opt = qk_options("qk_gram_squared_norms", scale, softcap, causal, window, threads);
  const bool tiny_roots = flag_arg(tiny_roots_arg, "qk_gram_squared_norms: tiny_roots");
  py::buffer_info q = q_buf.request(), k = k_buf.request(), c = c_buf.request(), o = writable(out_buf, "out"), mi;
  const QkInputs in = check_qk_inputs(q, k, key_mask, mi, &c, opt);
  if (o.format != py::format_descriptor<float>::format() || o.ndim != 3 || o.shape[0] != in.pb.batch ||
      o.shape[1] != in.pb.n || o.shape[2] != in.pb.n_k)
    fail_qk("out must be float32 (B, N, N_k) = (" + std::to_string(in.pb.batch) + ", " + std::to_string(in.pb.n) + ", " +
            std::to_string(in.pb.n_k) + "), got format '" + o.format + "' shape " + shape_str(o));
  require_f32_c(o, "out", 3);
  if (in.pb.batch == 0 || in.pb.n == 0) return false;
  float* op = static_cast<float*>(o.ptr);
  py::gil_scoped_release release;
  return duat::qk_gram_squared_norms(in.q, in.k, in.key_mask, in.c, op, in.pb, opt.num_threads, tiny_roots);
}

void qk_gram_grid_norms(py::buffer q_buf, py::buffer k_buf, py::object key_mask, py::buffer c_buf, py::buffer row_bin_buf,
                        py::buffer col_bin_buf, py::buffer out_buf, py::handle scale, py::handle softcap,
                        py::handle causal, py::handle window, py::handle threads) {
  const QkOptions opt = qk_options("qk_gram_grid_norms", scale, softcap, causal, window, threads);
  py::buffer_info q = q_buf.request(), k = k_buf.request(), c = c_buf.request(), rb = row_bin_buf.request(),
                  cb = col_bin_buf.request(), o = writable(out_buf, "out"), mi;
  const QkInputs in = check_qk_inputs(q, k, key_mask, mi, &c, opt);
  const std::string i64 = py::format_descriptor<int64_t>::format();
  for (const auto* b : {&rb, &cb}) {
    const char* name = b == &rb ? "row_bin" : "col_bin";
    if (!(b->format == i64 || ((b->format == "l" || b->format == "q") && b->itemsize == 8)))
      fail_qk(std::string(name) + " must hold int64, got format '" + b->format + "'");
    const int64_t len = b == &rb ? in.pb.n : in.pb.n_k;  // a super-block per query, per key
    if (b->ndim != 1 || b->shape[0] != len || (len > 1 && b->strides[0] != 8))
      fail_qk(std::string(name) + " must be a contiguous (" + (b == &rb ? "N" : "N_k") + ",) = (" + std::to_string(len) +
              ",) vector, got shape " + shape_str(*b));
  }
  if (o.format != py::format_descriptor<double>::format() || o.ndim != 3 || o.shape[0] != in.pb.batch)
    fail_qk("out must be float64 (B, R, C) with B = " + std::to_string(in.pb.batch) + ", got format '" + o.format +
            "' shape " + shape_str(o));
  int64_t expected = 8;
  for (int64_t d = 2; d >= 0; --d) {
    if (o.shape[d] != 1 && o.strides[d] != expected) fail_qk("out must be C-contiguous");
    expected *= o.shape[d];
  }
  const int64_t out_rows = o.shape[1], out_cols = o.shape[2];
  const int64_t *rp = static_cast<const int64_t*>(rb.ptr), *cp = static_cast<const int64_t*>(cb.ptr);
  for (int64_t r = 0; r < in.pb.n; ++r)
    if (rp[r] < 0 || rp[r] >= out_rows) fail_qk("row_bin[" + std::to_string(r) + "] is out of range");
  for (int64_t m = 0; m < in.pb.n_k; ++m)
    if (cp[m] < 0 || cp[m] >= out_cols) fail_qk("col_bin[" + std::to_string(m) + "] is out of range");
  if (in.pb.batch == 0 || in.pb.n == 0) return;
  double* op = static_cast<double*>(o.ptr);
  py::gil_scoped_release release;
  duat::qk_gram_grid_norms(in.q, in.k, in.key_mask, in.c, rp, cp, op, out_rows, out_cols, in.pb, opt.num_threads);
}

void qk_mix_transposed(py::buffer q_buf, py::buffer k_buf, py::object key_mask, py::buffer u_buf, py::buffer out_buf,
                       py::handle scale, py::handle softcap, py::handle causal, py::handle window, py::handle threads) {
  const QkOptions opt = qk_options("qk_mix_transposed", scale, softcap, causal, window, threads);
  py::buffer_info q = q_buf.request(), k = k_buf.request(), u = u_buf.request(), o = writable(out_buf, "out"), mi;
  require_f32_c(u, "u", 4);
  require_f32_c(o, "out", 4);
  const QkInputs in = check_qk_inputs(q, k, key_mask, mi, nullptr, opt);
  if (u.shape[0] != in.pb.batch || u.shape[1] != in.pb.h || u.shape[2] != in.pb.n)
    fail_qk("u must be (B, h, N, e) with (B, h, N) = (" + std::to_string(in.pb.batch) + ", " + std::to_string(in.pb.h) +
            ", " + std::to_string(in.pb.n) + "), got shape " + shape_str(u));
  if (o.shape[0] != u.shape[0] || o.shape[1] != u.shape[1] || o.shape[2] != in.pb.n_k || o.shape[3] != u.shape[3])
    fail_qk("out must be (B, h, N_k, e) = (" + std::to_string(in.pb.batch) + ", " + std::to_string(in.pb.h) + ", " +
            std::to_string(in.pb.n_k) + ", " + std::to_string(u.shape[3]) + "), got shape " + shape_str(o));
  const int64_t e = u.shape[3];
  if (in.pb.batch == 0 || in.pb.n == 0 || e == 0) {  // no query rows: Aᵀ U = 0 over the N_k keys
    std::fill(static_cast<float*>(o.ptr), static_cast<float*>(o.ptr) + in.pb.batch * in.pb.h * in.pb.n_k * e, 0.0f);
    return;
  }
  const float* up = static_cast<const float*>(u.ptr);
  float* op = static_cast<float*>(o.ptr);
  py::gil_scoped_release release;
  duat::qk_mix_transposed(in.q, in.k, in.key_mask, up, op, e, in.pb, opt.num_threads);
}

void qk_mix(py::buffer q_buf, py::buffer k_buf, py::object key_mask, py::buffer v_buf, py::buffer out_buf,
            py::handle scale, py::handle softcap, py::handle causal, py::handle window, py::handle threads) {
  const QkOptions opt = qk_options("qk_mix", scale, softcap, causal, window, threads);
  py::buffer_info q = q_buf.request(), k = k_buf.request(), v = v_buf.request(), o = writable(out_buf, "out"), mi;
  require_f32_c(v, "values", 4);
  require_f32_c(o, "out", 4);
  const QkInputs in = check_qk_inputs(q, k, key_mask, mi, nullptr, opt);
  if (v.shape[0] != in.pb.batch || v.shape[1] != in.pb.h_kv || v.shape[2] != in.pb.n_k)
    fail_qk("values must be (B, h_kv, N_k, e) with (B, h_kv, N_k) = (" + std::to_string(in.pb.batch) + ", " +
            std::to_string(in.pb.h_kv) + ", " + std::to_string(in.pb.n_k) + "), got shape " + shape_str(v));
  const int64_t e = v.shape[3];
  if (o.shape[0] != in.pb.batch || o.shape[1] != in.pb.h || o.shape[2] != in.pb.n || o.shape[3] != e)
    fail_qk("out must be (B, h, N, e) = (" + std::to_string(in.pb.batch) + ", " + std::to_string(in.pb.h) + ", " +
            std::to_string(in.pb.n) + ", " + std::to_string(e) + "), got shape " + shape_str(o));
  if (in.pb.batch == 0 || in.pb.n == 0 || e == 0) return;
  const float* vp = static_cast<const float*>(v.ptr);
  float* op = static_cast<float*>(o.ptr);
  py::gil_scoped_release release;
  duat::qk_mix(in.q, in.k, in.key_mask, vp, op, e, in.pb, opt.num_threads);
}

void vector_exp(py::buffer x_buf, py::buffer y_buf) {
  py::buffer_info x = x_buf.request(), y = writable(y_buf, "y");
  require_f32_c(x, "x", 1);
  require_f32_c(y, "y", 1);
  if (y.shape[0] != x.shape[0]) fail_qk("y must have the shape of x");
  duat::active().exp_f32(static_cast<const float*>(x.ptr), x.shape[0], static_cast<float*>(y.ptr));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "C++ (OpenMP) kernels of duat_kernels; use duat_kernels.hvo_matrix, not this module.";
  m.def("kron_sum", &kron_sum, py::arg("lt"), py::arg("rt"), py::arg("out"), py::arg("out_dtype"),
        py::arg("row0") = 0, py::arg("col0") = 0, py::arg("num_threads") = 1,
        "Write the tile [row0, row0+rows) x [col0, col0+cols) of sum_i L_i (x) R_i into out.\n"
        "lt: L (h, P, S) float32/float64, rt: R (h, Q, T) same dtype, any non-negative strides (T's = 1),\n"
        "out: (rows, cols) C-contiguous.");
  m.def("kron_sum_factored", &kron_sum_factored, py::arg("lt"), py::arg("wo"), py::arg("wv"), py::arg("out"),
        py::arg("out_dtype"), py::arg("kv_heads"), py::arg("row0") = 0, py::arg("col0") = 0, py::arg("num_threads") = 1,
        "Write the tile [row0, row0+rows) x [col0, col0+cols) of the token-layout W = sum_i A_i (x) OV_i into out,\n"
        "OV_i = Wo_i Wv_(i // g) computed in cache (never written): lt = A (h, P, S) (any non-negative strides),\n"
        "wo (Q, h*d), wv (h_kv*d, T) C-contiguous, out (rows, cols) C-contiguous.");
  m.def("ov_slabs", &ov_slabs, py::arg("wo"), py::arg("wv"), py::arg("out"), py::arg("heads"), py::arg("kv_heads"),
        py::arg("num_threads") = 1,
        "Write OV_i = Wo_i Wv_(i // g) as out (M_out, h, M_in) for wo (M_out, h*d) and wv (h_kv*d, M_in),\n"
        "all C-contiguous float32 or float64.");
  m.def(
      "alloc_output",
      [](py::handle nbytes_arg) {
        const int64_t nbytes = int_arg(nbytes_arg, "alloc_output: nbytes");
        if (nbytes < 0) throw std::invalid_argument("alloc_output: nbytes must be non-negative");
        duat::OutputBlock taken;
        try {
          taken = duat::take_output_block(static_cast<size_t>(nbytes));
        } catch (const std::bad_alloc&) {  // was MemoryError "std::bad_alloc", naming no size
          PyErr_SetString(PyExc_MemoryError, ("duat_kernels._C.alloc_output: cannot map " + std::to_string(nbytes) +
                                              " bytes for an output").c_str());
          throw py::error_already_set();
        }
        auto* block = new duat::OutputBlock(taken);
        py::capsule owner(block, [](void* p) {
          auto* b = static_cast<duat::OutputBlock*>(p);
          duat::give_output_block(*b);
          delete b;
        });
        return py::array_t<uint8_t>({nbytes}, {int64_t(1)}, static_cast<uint8_t*>(block->ptr), owner);
      },
      py::arg("nbytes"),
      "A writable uint8 array of nbytes from the output cache: 2 MiB aligned, huge-page advised, resident\n"
      "when a freed block of the same size was cached; its memory returns to the cache when freed.");
  m.def("release_output_cache", [] { duat::release_output_cache(); }, "Unmap every cached output block.");
  m.def(
      "output_cache_info",
      [] {
        const duat::OutputCacheInfo i = duat::output_cache_info();
        py::dict d;
        d["cached_bytes"] = i.cached_bytes;
        d["cached_blocks"] = i.cached_blocks;
        d["limit_bytes"] = i.limit_bytes;
        d["hits"] = i.hits;
        d["misses"] = i.misses;
        return d;
      },
      "Bytes and blocks held by the output cache, its limit, and its hits and misses so far.");
  m.def(
      "set_output_cache_limit", [](py::handle bytes_arg) {
        const int64_t bytes = int_arg(bytes_arg, "set_output_cache_limit: bytes");
        if (bytes < 0) throw std::invalid_argument("set_output_cache_limit: bytes must be non-negative");
        duat::set_output_cache_limit(static_cast<size_t>(bytes));
      },
      py::arg("bytes"), "Cap the bytes the output cache keeps (0 turns it off); evicts the oldest blocks.");
  m.def(
      "fma_peak_gflops",
      [](py::handle iterations_arg, py::handle threads) {
        const int64_t iterations = int_arg(iterations_arg, "fma_peak_gflops: iterations");
        if (iterations <= 0) throw std::invalid_argument("fma_peak_gflops: iterations must be positive");
        const int num_threads = threads_arg(threads, "fma_peak_gflops");
        const duat::IsaKernels& kernels = duat::active();
        py::gil_scoped_release release;
        return kernels.fma_peak_gflops(iterations, num_threads);
      },
      py::arg("iterations") = 20000000, py::arg("num_threads") = 1,
      "Float32 FMA throughput in GFLOP/s of register-only vector FMA chains of the active ISA variant:\n"
      "the arithmetic floor of kron_sum.");
  m.def(
      "micro_kernel_gflops",
      [](py::handle out_dtype_arg, py::handle h_arg, py::handle cols_arg, py::handle segments_arg,
         py::handle reps_arg) {
        const std::string out_dtype = str_arg(out_dtype_arg, "micro_kernel_gflops: out_dtype");
        const int64_t h = int_arg(h_arg, "micro_kernel_gflops: h"), cols = int_arg(cols_arg, "micro_kernel_gflops: cols");
        const int64_t segments = int_arg(segments_arg, "micro_kernel_gflops: segments");
        const int64_t reps = int_arg(reps_arg, "micro_kernel_gflops: reps");
        const duat::OutType ot = parse_out_type(out_dtype);
        if (ot == duat::OutType::kFloat64) fail("micro_kernel_gflops: out_dtype must be float32, float16 or bfloat16, got 'float64'");
        if (h < 1 || h > 256) fail("micro_kernel_gflops: h must be in [1, 256], got " + std::to_string(h));
        if (cols < 64 || cols > 1024 || cols % 64 != 0)
          fail("micro_kernel_gflops: cols must be a multiple of 64 in [64, 1024], got " + std::to_string(cols));
        if (segments < 1 || segments > 48) fail("micro_kernel_gflops: segments must be in [1, 48], got " + std::to_string(segments));
        if (reps < 1) fail("micro_kernel_gflops: reps must be positive, got " + std::to_string(reps));
        const duat::IsaKernels& kernels = duat::active();
        py::gil_scoped_release release;
        return kernels.micro_kernel_gflops(ot, h, cols, static_cast<int>(segments), reps);
      },
      py::arg("out_dtype"), py::arg("h"), py::arg("cols") = 128, py::arg("segments") = 12, py::arg("reps") = 20000,
      "GFLOP/s (2h flops per entry) of one thread running the kron_sum micro-kernels of the active ISA\n"
      "variant with every operand in L1: `segments` whole segments of `cols` columns from one h x cols\n"
      "slab, `reps` times, stored as out_dtype. Compare with fma_peak_gflops(num_threads=1).");
  m.def(
      "stream_fill",
      [](py::array out, py::handle value_arg, py::handle threads) {
        const int64_t value = int_arg(value_arg, "stream_fill: value");
        const int num_threads = threads_arg(threads, "stream_fill");
        if (!out.writeable()) throw std::invalid_argument("stream_fill: out must be writable");
        if (!(out.flags() & py::array::c_style)) throw std::invalid_argument("stream_fill: out must be C-contiguous");
        if (value < 0 || value > 255) throw std::invalid_argument("stream_fill: value must be a byte, 0 to 255");
        void* data = out.mutable_data();
        const int64_t nbytes = static_cast<int64_t>(out.nbytes());
        const duat::IsaKernels& kernels = duat::active();
        py::gil_scoped_release release;
        kernels.stream_fill(data, nbytes, static_cast<int>(value), num_threads);
      },
      py::arg("out"), py::arg("value"), py::arg("num_threads") = 1,
      "Set every byte of a C-contiguous array to value with the non-temporal stores of the active ISA\n"
      "variant, the store path of a large W': the memory-write floor of that path (for benchmarks).");
  m.def("cpu_capability", [] { return std::string(duat::active().name); },
        "The ISA variant of the kernels in use: baseline, avx2, avx512 or native.");
  m.def("set_cpu_capability", &duat::set_capability, py::arg("name"),
        "Use the named ISA variant (one of supported_capabilities()).");
  m.def(
      "compiled_capabilities",
      [] {
        std::vector<std::string> names;
        for (const duat::IsaKernels* v : duat::compiled_variants()) names.emplace_back(v->name);
        return names;
      },
      "The ISA variants compiled into this build, lowest first.");
  m.def(
      "supported_capabilities",
      [] {
        std::vector<std::string> names;
        for (const duat::IsaKernels* v : duat::compiled_variants())
          if (v->cpu_supports()) names.emplace_back(v->name);
        return names;
      },
      "The compiled ISA variants this CPU can run, lowest first.");
  m.def("gram_squared_norms", &gram_squared_norms, py::arg("a"), py::arg("c"), py::arg("out"),
        py::arg("num_threads") = 1, py::arg("root") = false,
        "out[r, m] = ||c @ a[:, r, m]||^2 for a (h, rows, cols) float32, c (h, h) float32, out (rows, cols) float32;\n"
        "with root=True its square root, ||c @ a[:, r, m]||.");
  m.def("gram_grid_norms", &gram_grid_norms, py::arg("a"), py::arg("c"), py::arg("row_bin"), py::arg("col_bin"),
        py::arg("out"), py::arg("num_threads") = 1,
        "out[row_bin[r], col_bin[m]] += ||c @ a[:, r, m]||^2; row_bin (rows,), col_bin (cols,) int64, out float64.");
  m.def("qk_gram_squared_norms", &qk_gram_squared_norms, py::arg("q"), py::arg("k"), py::arg("key_mask"), py::arg("c"),
        py::arg("out"), py::arg("scale"), py::arg("softcap") = 0.0, py::arg("causal") = false, py::arg("window") = 0,
        py::arg("num_threads") = 1, py::arg("tiny_roots") = false,
        "out[b, n, m] = ||c @ A[b, :, n, m]||^2 with A = softmax(scale q k^T (soft-capped, masked)) never written;\n"
        "a square float32 cannot hold (tiny A) as -||c @ A[b, :, n, m]|| with tiny_roots, else its nearest float32;\n"
        "returns whether there is any;\n"
        "q (B, h, N, d), k (B, h_kv, N, d), c (h, h) float32, key_mask (B, N) bool/uint8 or None, out (B, N, N) float32.");
  m.def("qk_gram_grid_norms", &qk_gram_grid_norms, py::arg("q"), py::arg("k"), py::arg("key_mask"), py::arg("c"),
        py::arg("row_bin"), py::arg("col_bin"), py::arg("out"), py::arg("scale"), py::arg("softcap") = 0.0,
        py::arg("causal") = false, py::arg("window") = 0, py::arg("num_threads") = 1,
        "out[b, row_bin[n], col_bin[m]] += ||c @ A[b, :, n, m]||^2 (out (B, R, C) float64), A never written.");
  m.def("qk_mix_transposed", &qk_mix_transposed, py::arg("q"), py::arg("k"), py::arg("key_mask"), py::arg("u"),
        py::arg("out"), py::arg("scale"), py::arg("softcap") = 0.0, py::arg("causal") = false, py::arg("window") = 0,
        py::arg("num_threads") = 1,
        "out[b, i] = A[b, i]^T u[b, i] for u, out (B, h, N, e) float32, A = softmax(scale q k^T (soft-capped, masked))\n"
        "recomputed per head and row block, never stored.");
  m.def("qk_mix", &qk_mix, py::arg("q"), py::arg("k"), py::arg("key_mask"), py::arg("values"), py::arg("out"),
        py::arg("scale"), py::arg("softcap") = 0.0, py::arg("causal") = false, py::arg("window") = 0,
        py::arg("num_threads") = 1,
        "out[b, i] = A[b, i] values[b, i // (h / h_kv)] for values (B, h_kv, N, e), out (B, h, N, e) float32, A\n"
        "recomputed per head and row block, never stored.");
  m.def("vector_exp", &vector_exp, py::arg("x"), py::arg("y"),
        "y = exp(x) (float32 vectors) with the active ISA variant's vectorised exponential.");
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
