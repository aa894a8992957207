// edgesmith: a small stand-in for TVM's <tvm/support/io.h>, which the apache-tvm wheel's runtime
// sources include but the wheel does not ship. Written for edgesmith from what the including code
// calls (a byte stream with typed Read/Write through a Serializer trait); Apache-2.0, like TVM.
#ifndef EDGESMITH_TVM_SUPPORT_IO_H_
#define EDGESMITH_TVM_SUPPORT_IO_H_

#include <cstddef>
#include <cstdint>

namespace tvm {
namespace support {

// Serializer<T> says how T goes to and from a Stream. Specialisations set `enabled` and provide
// static void Write(Stream*, const T&) and static bool Read(Stream*, T*). The second parameter
// lets specialisations select on traits (arithmetic, enum).
template <typename T, typename Enable = void>
struct Serializer {
  static constexpr bool enabled = false;
};

// A byte stream: subclasses implement the two raw methods; the templates dispatch to Serializer.
class Stream {
 public:
  virtual ~Stream() = default;
  virtual size_t Read(void* ptr, size_t size) = 0;
  virtual size_t Write(const void* ptr, size_t size) = 0;

  template <typename T>
  void Write(const T& value) {
    static_assert(Serializer<T>::enabled, "type has no tvm::support::Serializer");
    Serializer<T>::Write(this, value);
  }

  template <typename T>
  bool Read(T* out) {
    static_assert(Serializer<T>::enabled, "type has no tvm::support::Serializer");
    return Serializer<T>::Read(this, out);
  }

  template <typename T>
  void WriteArray(const T* items, size_t count) {
    for (const T* end = items + count; items != end; ++items) Write<T>(*items);
  }

  template <typename T>
  bool ReadArray(T* items, size_t count) {
    for (const T* end = items + count; items != end; ++items) {
      if (!Read<T>(items)) return false;
    }
    return true;
  }
};

}  // namespace support
}  // namespace tvm

#endif  // EDGESMITH_TVM_SUPPORT_IO_H_
