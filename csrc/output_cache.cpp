// The block cache behind cached_empty (output_cache.h). Blocks are sized in 64 KiB steps and
// reused only for a request of the same step count: a workload that repeats its shapes (a
// training loop, a served model) finds its blocks again. Idle blocks beyond kIdleLimitBytes go
// back to the system as they are released.
#include "output_cache.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <cstdlib>
#include <mutex>
#ifndef _WIN32
#include <pthread.h>
#endif
#include <unordered_map>
#include <vector>

namespace fastmb {
namespace {

constexpr size_t kMinBytes = size_t(1) << 20;  // smaller blocks stay in malloc's heap, reused without faults
constexpr size_t kStepBytes = size_t(64) << 10;
constexpr size_t kIdleLimitBytes = size_t(1) << 30;
constexpr size_t kAlignment = 64;

struct Block {
  void* data;
  size_t bytes;
};

class OutputCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    if (bytes < kMinBytes) return c10::GetCPUAllocator()->allocate(bytes);
    const size_t rounded = (bytes + kStepBytes - 1) / kStepBytes * kStepBytes;
    Block* block = take(rounded);
    if (block == nullptr) {
      void* data = std::aligned_alloc(kAlignment, rounded);
      if (data == nullptr) {  // the cache's idle blocks may be what is missing
        release_idle();
        data = std::aligned_alloc(kAlignment, rounded);
      }
      TORCH_CHECK(data != nullptr, "fastmb: out of memory allocating ", rounded, " bytes");
      block = new Block{data, rounded};
    }
    return {block->data, block, &OutputCache::give_back, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }  // blocks are freed through their context

  void copy_data(void* dest, const void* src, size_t count) const override { default_copy_data(dest, src, count); }

  // Held across fork() (pthread_atfork): a child forked while another thread held the lock
  // would find it locked for good.
  void lock() { mutex_.lock(); }
  void unlock() { mutex_.unlock(); }

  size_t release_idle() {
    std::vector<Block*> blocks;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      for (auto& [size, list] : idle_) blocks.insert(blocks.end(), list.begin(), list.end());
      idle_.clear();
      idle_bytes_ = 0;
    }
    size_t bytes = 0;
    for (Block* block : blocks) bytes += free_block(block);
    return bytes;
  }

 private:
  Block* take(size_t bytes) {
    const std::lock_guard<std::mutex> lock(mutex_);
    const auto it = idle_.find(bytes);
    if (it == idle_.end() || it->second.empty()) return nullptr;
    Block* block = it->second.back();
    it->second.pop_back();
    idle_bytes_ -= bytes;
    return block;
  }

  static size_t free_block(Block* block) {
    const size_t bytes = block->bytes;
    std::free(block->data);
    delete block;
    return bytes;
  }

  static void give_back(void* context);

  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<Block*>> idle_;
  size_t idle_bytes_ = 0;
};

// Never destroyed: tensors still alive at exit release their blocks into it.
OutputCache& cache() {
  static OutputCache* const instance = [] {
    OutputCache* created = new OutputCache();
#ifndef _WIN32
    pthread_atfork([] { cache().lock(); }, [] { cache().unlock(); }, [] { cache().unlock(); });
#endif
    return created;
  }();
  return *instance;
}

void OutputCache::give_back(void* context) {
  Block* block = static_cast<Block*>(context);
  OutputCache& self = cache();
  {
    const std::lock_guard<std::mutex> lock(self.mutex_);
    if (self.idle_bytes_ + block->bytes <= kIdleLimitBytes) {
      self.idle_[block->bytes].push_back(block);
      self.idle_bytes_ += block->bytes;
      return;
    }
  }
  free_block(block);
}

bool cacheable(const at::TensorOptions& options) {
  return options.device().type() == c10::DeviceType::CPU && !options.pinned_memory() && options.layout() == c10::kStrided;
}

}  // namespace

at::Tensor cached_empty(at::IntArrayRef shape, const at::TensorOptions& options, at::MemoryFormat format) {
  if (!cacheable(options)) return at::empty(shape, options.memory_format(format));
  return at::detail::empty_generic(shape, &cache(), c10::DispatchKeySet(c10::DispatchKey::CPU), options.dtype().toScalarType(), format);
}

at::Tensor cached_empty_like(const at::Tensor& x) {
  if (!cacheable(x.options()) || !x.is_non_overlapping_and_dense()) return at::empty_like(x);
  return at::detail::empty_strided_generic(x.sizes(), x.strides(), &cache(), c10::DispatchKeySet(c10::DispatchKey::CPU), x.scalar_type());
}

int64_t release_cached_outputs() { return int64_t(cache().release_idle()); }

}  // namespace fastmb
