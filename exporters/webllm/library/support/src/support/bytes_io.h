// edgesmith: a stand-in for TVM's src/support/bytes_io.h (not shipped in the apache-tvm wheel):
// streams over memory. Written for edgesmith from what the runtime sources call; Apache-2.0.
#ifndef EDGESMITH_TVM_SRC_SUPPORT_BYTES_IO_H_
#define EDGESMITH_TVM_SRC_SUPPORT_BYTES_IO_H_

#include <tvm/ffi/error.h>
#include <tvm/ffi/string.h>
#include <tvm/support/io.h>

#include <cstring>
#include <string>

namespace tvm {
namespace support {

// Reads a borrowed byte range front to back; the owner must outlive the stream.
class BytesInStream : public Stream {
 public:
  using Stream::Read;
  using Stream::Write;

  BytesInStream(const void* data, size_t size) : begin_(static_cast<const char*>(data)), size_(size) {}
  explicit BytesInStream(const std::string& s) : BytesInStream(s.data(), s.size()) {}
  explicit BytesInStream(const ffi::Bytes& b) : BytesInStream(b.data(), b.size()) {}

  size_t Read(void* ptr, size_t size) override {
    size_t n = size < size_ - offset_ ? size : size_ - offset_;
    if (n != 0) std::memcpy(ptr, begin_ + offset_, n);
    offset_ += n;
    return n;
  }

  size_t Write(const void*, size_t) override {
    TVM_FFI_THROW(InternalError) << "BytesInStream is read-only";
    return 0;
  }

 private:
  const char* begin_;
  size_t size_;
  size_t offset_ = 0;
};

// Appends everything written to a caller-owned std::string.
class BytesOutStream : public Stream {
 public:
  using Stream::Read;
  using Stream::Write;

  explicit BytesOutStream(std::string* sink) : sink_(sink) {}

  size_t Write(const void* ptr, size_t size) override {
    sink_->append(static_cast<const char*>(ptr), size);
    return size;
  }

  size_t Read(void*, size_t) override {
    TVM_FFI_THROW(InternalError) << "BytesOutStream is write-only";
    return 0;
  }

 private:
  std::string* sink_;
};

}  // namespace support
}  // namespace tvm

#endif  // EDGESMITH_TVM_SRC_SUPPORT_BYTES_IO_H_
