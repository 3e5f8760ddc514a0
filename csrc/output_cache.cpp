// Memory for large outputs of the C++ backend (W' materialised without out=).
//
// A fresh anonymous mapping costs a page fault and the kernel zeroing each page on first touch:
// for W' that is a second full pass over memory before the kernel's own writes (2-3x the cost of
// writing into a reused buffer, even with huge pages). So a freed output block is kept, up to a byte
// limit, and handed to the next output of the same (2 MiB-rounded) size, whose pages are then
// already resident. A request of another size releases every cached block first, so the cache never
// stands between a new output and the memory it needs. Blocks are 2 MiB aligned and advised for
// transparent huge pages.
#include "output_cache.h"

#include <cstdlib>
#include <mutex>
#include <new>
#include <vector>

#if defined(__linux__) || defined(__APPLE__)
#include <sys/mman.h>
#include <unistd.h>
#define DUAT_HAVE_MMAP 1
#endif

namespace duat {
namespace {

constexpr size_t kAlign = size_t(2) << 20;

struct Cache {
  std::mutex mu;
  std::vector<OutputBlock> free_blocks;
  size_t cached = 0, limit = 0;
  uint64_t hits = 0, misses = 0;

  Cache() {
    // Default limit: an eighth of physical memory; DUAT_OUTPUT_CACHE_BYTES overrides it (0 = off).
    const char* env = std::getenv("DUAT_OUTPUT_CACHE_BYTES");
    if (env != nullptr && *env != '\0') {
      limit = static_cast<size_t>(std::strtoull(env, nullptr, 10));
    } else {
#if defined(DUAT_HAVE_MMAP)
      const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
      limit = pages > 0 && page > 0 ? static_cast<size_t>(pages) * static_cast<size_t>(page) / 8 : 0;
#endif
    }
  }
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: blocks may be freed during interpreter shutdown
  return *c;
}

size_t rounded(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

void unmap(const OutputBlock& b) {
#if defined(DUAT_HAVE_MMAP)
  munmap(b.ptr, b.bytes);
#else
  std::free(b.ptr);
#endif
}

void* map(size_t bytes) {
#if defined(DUAT_HAVE_MMAP)
  // Over-map by 2 MiB and trim, so the block starts on a huge-page boundary.
  void* raw = mmap(nullptr, bytes + kAlign, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) throw std::bad_alloc();
  const uintptr_t start = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (start + kAlign - 1) & ~(uintptr_t(kAlign) - 1);
  if (aligned > start) munmap(raw, aligned - start);
  const uintptr_t tail = aligned + bytes, end = start + bytes + kAlign;
  if (end > tail) munmap(reinterpret_cast<void*>(tail), end - tail);
#if defined(MADV_HUGEPAGE)
  madvise(reinterpret_cast<void*>(aligned), bytes, MADV_HUGEPAGE);  // advice only
#endif
  return reinterpret_cast<void*>(aligned);
#else
  void* p = std::aligned_alloc(kAlign, bytes);
  if (p == nullptr) throw std::bad_alloc();
  return p;
#endif
}

void evict_to_limit_locked(Cache& c) {  // oldest first
  while (c.cached > c.limit) {
    unmap(c.free_blocks.front());
    c.cached -= c.free_blocks.front().bytes;
    c.free_blocks.erase(c.free_blocks.begin());
  }
}

void release_locked(Cache& c) {
  for (const OutputBlock& b : c.free_blocks) unmap(b);
  c.free_blocks.clear();
  c.cached = 0;
}

}  // namespace

OutputBlock take_output_block(size_t bytes) {
  const size_t size = rounded(bytes > 0 ? bytes : 1);
  Cache& c = cache();
  {
    std::lock_guard<std::mutex> lock(c.mu);
    for (size_t i = c.free_blocks.size(); i-- > 0;) {
      if (c.free_blocks[i].bytes == size) {
        const OutputBlock b = c.free_blocks[i];
        c.free_blocks.erase(c.free_blocks.begin() + static_cast<std::ptrdiff_t>(i));
        c.cached -= b.bytes;
        ++c.hits;
        return b;
      }
    }
    ++c.misses;
    release_locked(c);  // another size: give the memory back before asking for more
  }
  return OutputBlock{map(size), size};
}

void give_output_block(const OutputBlock& b) {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  if (b.bytes > c.limit) {
    unmap(b);
    return;
  }
  c.free_blocks.push_back(b);
  c.cached += b.bytes;
  evict_to_limit_locked(c);
}

void release_output_cache() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  release_locked(c);
}

OutputCacheInfo output_cache_info() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  return OutputCacheInfo{c.cached, c.free_blocks.size(), c.limit, c.hits, c.misses};
}

void set_output_cache_limit(size_t bytes) {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  c.limit = bytes;
  evict_to_limit_locked(c);
}

}  // namespace duat
