// edgesmith: a stand-in for TVM's <tvm/support/cuda/nvtx.h> (not shipped in the apache-tvm wheel).
// The web runtime has no NVTX profiler, so a scoped range is an empty RAII object. Written for
// edgesmith from what the runtime sources call; Apache-2.0, like TVM.
#ifndef EDGESMITH_TVM_SUPPORT_CUDA_NVTX_H_
#define EDGESMITH_TVM_SUPPORT_CUDA_NVTX_H_

#include <string>

namespace tvm {
namespace support {

class NVTXScopedRange {
 public:
  explicit NVTXScopedRange(const char*) {}
  explicit NVTXScopedRange(const std::string&) {}
  NVTXScopedRange(const NVTXScopedRange&) = delete;
  NVTXScopedRange& operator=(const NVTXScopedRange&) = delete;
};

}  // namespace support
}  // namespace tvm

#define TVM_NVTX_FUNC_SCOPE()

#endif  // EDGESMITH_TVM_SUPPORT_CUDA_NVTX_H_
