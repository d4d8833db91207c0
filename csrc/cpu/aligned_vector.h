// Scratch vectors whose data starts on a 64-byte cache line. std::vector's heap blocks start 16
// bytes past one, so every 64-byte vector load or store of a channels-last row in them (channel
// counts of 16 and up) straddled two lines and cost two accesses: the eval depthwise rows ran
// 1.07-1.35x faster over aligned buffers (bench/results/2026-12-03-prefetch-and-alignment.md).
#pragma once

#include <cstddef>
#include <new>
#include <vector>

namespace fastmb::cpu {

template <typename T>
struct LineAlignedAllocator {
  using value_type = T;
  static constexpr std::align_val_t kAlignment{64};
  LineAlignedAllocator() = default;
  template <typename U>
  LineAlignedAllocator(const LineAlignedAllocator<U>&) noexcept {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kAlignment)); }
  void deallocate(T* p, std::size_t) noexcept { ::operator delete(p, kAlignment); }
  template <typename U>
  bool operator==(const LineAlignedAllocator<U>&) const noexcept {
    return true;
  }
};

template <typename T>
using AlignedVector = std::vector<T, LineAlignedAllocator<T>>;

}  // namespace fastmb::cpu
