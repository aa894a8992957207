// edgesmith: a stand-in for TVM's src/support/base64.h (not shipped in the apache-tvm wheel):
// standard base64 (RFC 4648 alphabet, '=' padding) over another Stream, used for tensors in JSON.
// Written for edgesmith from what the runtime sources call; Apache-2.0, like TVM.
#ifndef EDGESMITH_TVM_SRC_SUPPORT_BASE64_H_
#define EDGESMITH_TVM_SRC_SUPPORT_BASE64_H_

#include <tvm/ffi/error.h>
#include <tvm/support/io.h>

#include <cctype>
#include <cstdint>

namespace tvm {
namespace support {

namespace base64_detail {
inline const char* Alphabet() {
  return "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
}
// 0..63 for an alphabet character, -1 otherwise.
inline int Value(int c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '+') return 62;
  if (c == '/') return 63;
  return -1;
}
}  // namespace base64_detail

// Encodes what is written into `sink`; call Finish() once at the end to flush and pad.
class Base64OutStream : public Stream {
 public:
  using Stream::Read;
  using Stream::Write;

  explicit Base64OutStream(Stream* sink) : sink_(sink) {}

  size_t Write(const void* ptr, size_t size) override {
    const uint8_t* bytes = static_cast<const uint8_t*>(ptr);
    for (size_t i = 0; i < size; ++i) {
      group_[held_++] = bytes[i];
      if (held_ == 3) EmitGroup();
    }
    return size;
  }

  size_t Read(void*, size_t) override {
    TVM_FFI_THROW(InternalError) << "Base64OutStream is write-only";
    return 0;
  }

  void Finish() {
    if (held_ != 0) EmitGroup();
  }

 private:
  void EmitGroup() {
    const char* abc = base64_detail::Alphabet();
    uint32_t v = (uint32_t(group_[0]) << 16) | (held_ > 1 ? uint32_t(group_[1]) << 8 : 0) |
                 (held_ > 2 ? uint32_t(group_[2]) : 0);
    char out[4] = {abc[(v >> 18) & 63], abc[(v >> 12) & 63], held_ > 1 ? abc[(v >> 6) & 63] : '=',
                   held_ > 2 ? abc[v & 63] : '='};
    sink_->Write(static_cast<const void*>(out), sizeof(out));
    held_ = 0;
  }

  Stream* sink_;
  uint8_t group_[3] = {0, 0, 0};
  size_t held_ = 0;
};

// Decodes base64 text read from `source`; whitespace is skipped, '=' or the end of input stops it.
class Base64InStream : public Stream {
 public:
  using Stream::Read;
  using Stream::Write;

  explicit Base64InStream(Stream* source) : source_(source) {}

  // Kept for the callers' protocol: decoding starts at the first non-space character anyway.
  void InitPosition() {}

  size_t Read(void* ptr, size_t size) override {
    uint8_t* out = static_cast<uint8_t*>(ptr);
    size_t n = 0;
    while (n < size) {
      if (next_ == count_ && !DecodeGroup()) break;
      out[n++] = decoded_[next_++];
    }
    return n;
  }

  size_t Write(const void*, size_t) override {
    TVM_FFI_THROW(InternalError) << "Base64InStream is read-only";
    return 0;
  }

 private:
  // Next non-space character, or -1 at the end of input.
  int NextChar() {
    char c;
    do {
      if (source_->Read(static_cast<void*>(&c), 1) != 1) return -1;
    } while (std::isspace(static_cast<unsigned char>(c)));
    return static_cast<unsigned char>(c);
  }

  bool DecodeGroup() {
    next_ = count_ = 0;
    if (ended_) return false;
    uint32_t v = 0;
    int digits = 0;
    for (; digits < 4; ++digits) {
      int c = NextChar();
      int d = base64_detail::Value(c);
      if (d < 0) {
        TVM_FFI_ICHECK(c == -1 || c == '=') << "invalid base64 character " << c;
        ended_ = true;
        break;
      }
      v = (v << 6) | uint32_t(d);
    }
    if (digits < 2) return false;
    v <<= 6 * (4 - digits);
    decoded_[0] = uint8_t(v >> 16);
    decoded_[1] = uint8_t(v >> 8);
    decoded_[2] = uint8_t(v);
    count_ = digits - 1;
    return true;
  }

  Stream* source_;
  uint8_t decoded_[3] = {0, 0, 0};
  size_t count_ = 0;  // decoded bytes held
  size_t next_ = 0;   // next of them to hand out
  bool ended_ = false;
};

}  // namespace support
}  // namespace tvm

#endif  // EDGESMITH_TVM_SRC_SUPPORT_BASE64_H_
