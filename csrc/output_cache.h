// A small cache of freed output blocks, so that a W' materialised without out= does not pay the
// kernel's page zeroing on every call (see output_cache.cpp).
#pragma once

#include <cstddef>
#include <cstdint>

namespace duat {

struct OutputBlock {
  void* ptr;
  size_t bytes;  // mapped size (the request rounded up to 2 MiB)
};

struct OutputCacheInfo {
  size_t cached_bytes, cached_blocks, limit_bytes;
  uint64_t hits, misses;
};

// A block of at least `bytes` bytes, 2 MiB aligned: a cached block of the same rounded size if there
// is one (already resident), else a new mapping (after releasing the cached blocks). Throws
// std::bad_alloc when the memory cannot be mapped.
OutputBlock take_output_block(size_t bytes);
// Returns a block: kept for reuse while the cached total stays within the limit, else unmapped.
void give_output_block(const OutputBlock& block);
void release_output_cache();
OutputCacheInfo output_cache_info();
void set_output_cache_limit(size_t bytes);

}  // namespace duat
