// fastmb::inverted_residual_chain's work, prepared once and run many times: the op prepares one
// and runs it once; a model's ForwardMemo keeps one per chain call (fastmb._C.prepare_chain,
// prepared_chain.cpp), so that a repeated eval forward skips the op's argument unboxing and its
// per-block checks (about 60 us of a 2 ms forward at batch 1: 165 optional tensors, read cold
// after the previous forward's weights went through the caches).
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace fastmb::cpu {

class StemRows;

// The chain op's stem_* arguments (no weight: no stem).
struct ChainStem {
  std::optional<at::Tensor> weight, scale, shift;
  std::vector<int64_t> stride{1, 1}, padding{0, 0}, dilation{1, 1};
  std::string activation = "identity";
};

class PreparedChain {
 public:
  // The op's arguments (held: the blocks read them in place), their counts checked; each block's
  // own checks run when run() first sees an x of its sizes, layout, dtype and device.
  PreparedChain(std::vector<std::optional<at::Tensor>> tensors, std::vector<int64_t> settings, std::vector<std::string> names,
                ChainStem stem);
  ~PreparedChain();
  // The blocks on x (the stem's image with a stem), as the op computes them. Safe to call from
  // several threads at once.
  at::Tensor run(const at::Tensor& x) const;

 private:
  struct Blocks;  // the stem and blocks made for one x's sizes, strides, dtype and device
  std::shared_ptr<const Blocks> blocks_for(const at::Tensor& x) const;

  std::vector<std::optional<at::Tensor>> tensors_;
  std::vector<int64_t> settings_;
  std::vector<std::string> names_;
  ChainStem stem_;
  int64_t blocks_;
  mutable std::mutex mutex_;
  mutable std::shared_ptr<const Blocks> last_;  // those of the last x seen
};

}  // namespace fastmb::cpu
