// edgesmith: a stand-in for TVM's src/support/ring_buffer.h (not shipped in the apache-tvm wheel):
// a growable FIFO byte queue used by the RPC endpoint. Written for edgesmith from what the runtime
// sources call; Apache-2.0, like TVM.
#ifndef EDGESMITH_TVM_SRC_SUPPORT_RING_BUFFER_H_
#define EDGESMITH_TVM_SRC_SUPPORT_RING_BUFFER_H_

#include <tvm/ffi/error.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace tvm {
namespace support {

class RingBuffer {
 public:
  RingBuffer() : ring_(kInitialBytes) {}

  size_t bytes_available() const { return size_; }

  // Make room for at least `n` queued bytes in total, keeping what is queued.
  void Reserve(size_t n) {
    if (n <= ring_.size()) return;
    size_t cap = ring_.size();
    while (cap < n) cap *= 2;
    std::vector<char> grown(cap);
    CopyOut(grown.data(), size_);
    ring_.swap(grown);
    head_ = 0;
  }

  // Pop exactly `size` bytes (the caller checks bytes_available() first).
  void Read(void* data, size_t size) {
    TVM_FFI_ICHECK_LE(size, size_) << "RingBuffer: read of " << size << " bytes, " << size_ << " queued";
    CopyOut(static_cast<char*>(data), size);
    Drop(size);
  }

  // Push `size` bytes, growing as needed.
  void Write(const void* data, size_t size) {
    Reserve(size_ + size);
    const char* src = static_cast<const char*>(data);
    size_t tail = (head_ + size_) % ring_.size();
    size_t first = std::min(size, ring_.size() - tail);
    std::memcpy(ring_.data() + tail, src, first);
    std::memcpy(ring_.data(), src + first, size - first);
    size_ += size;
  }

  // Hand the oldest contiguous queued bytes (at most max_nbytes) to frecv(ptr, n), which returns
  // how many it consumed; those are popped. Returns that count.
  template <typename F>
  size_t ReadWithCallback(F frecv, size_t max_nbytes) {
    size_t n = std::min({max_nbytes, size_, ring_.size() - head_});
    if (n == 0) return 0;
    size_t used = frecv(ring_.data() + head_, n);
    Drop(used);
    return used;
  }

  // Let fsend(ptr, n) fill up to max_nbytes of contiguous free space at the tail; it returns how
  // many bytes it wrote, which are queued. Returns that count.
  template <typename F>
  size_t WriteWithCallback(F fsend, size_t max_nbytes) {
    Reserve(size_ + max_nbytes);
    size_t tail = (head_ + size_) % ring_.size();
    size_t room = tail >= head_ && size_ != ring_.size() ? ring_.size() - tail : head_ - tail;
    size_t n = std::min(max_nbytes, room);
    if (n == 0) return 0;
    size_t wrote = fsend(ring_.data() + tail, n);
    size_ += wrote;
    return wrote;
  }

 private:
  static constexpr size_t kInitialBytes = 1024;

  void CopyOut(char* dst, size_t n) const {
    size_t first = std::min(n, ring_.size() - head_);
    std::memcpy(dst, ring_.data() + head_, first);
    std::memcpy(dst + first, ring_.data(), n - first);
  }

  void Drop(size_t n) {
    head_ = (head_ + n) % ring_.size();
    size_ -= n;
    if (size_ == 0) head_ = 0;
  }

  std::vector<char> ring_;
  size_t head_ = 0;  // index of the oldest queued byte
  size_t size_ = 0;  // queued bytes
};

}  // namespace support
}  // namespace tvm

#endif  // EDGESMITH_TVM_SRC_SUPPORT_RING_BUFFER_H_
