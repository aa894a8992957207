// edgesmith: a small stand-in for TVM's <tvm/support/serializer.h> (not shipped in the apache-tvm
// wheel). Written for edgesmith from what the runtime sources serialise; Apache-2.0, like TVM.
//
// Wire format (it must match what the TVM compiler writes into a model library, e.g. the WebGPU
// shader table and the Relax VM executable): little-endian scalars; enums as their underlying
// type; strings and sequences as a uint64 count followed by the items; maps as a uint64 count
// followed by key, value pairs; DLDataType as code:u8 bits:u8 lanes:u16; DLDevice as two int32.
#ifndef EDGESMITH_TVM_SUPPORT_SERIALIZER_H_
#define EDGESMITH_TVM_SUPPORT_SERIALIZER_H_

#include <dlpack/dlpack.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/endian.h>
#include <tvm/ffi/string.h>
#include <tvm/support/io.h>

#include <cstdint>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

namespace tvm {
namespace support {

namespace serial_detail {

// One scalar, in the file's (little-endian) byte order.
template <typename T>
inline void PutScalar(Stream* out, T value) {
  if (!TVM_FFI_IO_NO_ENDIAN_SWAP) ffi::ByteSwap(&value, sizeof(T), 1);
  out->Write(static_cast<const void*>(&value), sizeof(T));
}

template <typename T>
inline bool GetScalar(Stream* in, T* value) {
  if (in->Read(static_cast<void*>(value), sizeof(T)) != sizeof(T)) return false;
  if (!TVM_FFI_IO_NO_ENDIAN_SWAP) ffi::ByteSwap(value, sizeof(T), 1);
  return true;
}

inline void PutCount(Stream* out, size_t n) { PutScalar<uint64_t>(out, static_cast<uint64_t>(n)); }

inline bool GetCount(Stream* in, size_t* n) {
  uint64_t raw = 0;
  if (!GetScalar(in, &raw)) return false;
  *n = static_cast<size_t>(raw);
  return true;
}

inline void PutChars(Stream* out, const char* data, size_t n) {
  PutCount(out, n);
  if (n != 0) out->Write(static_cast<const void*>(data), n);
}

inline bool GetChars(Stream* in, std::string* s) {
  size_t n = 0;
  if (!GetCount(in, &n)) return false;
  s->resize(n);
  return n == 0 || in->Read(static_cast<void*>(&(*s)[0]), n) == n;
}

}  // namespace serial_detail

template <typename T>
struct Serializer<T, std::enable_if_t<std::is_arithmetic_v<T>>> {
  static constexpr bool enabled = true;
  static void Write(Stream* out, const T& v) { serial_detail::PutScalar<T>(out, v); }
  static bool Read(Stream* in, T* v) { return serial_detail::GetScalar<T>(in, v); }
};

template <typename T>
struct Serializer<T, std::enable_if_t<std::is_enum_v<T>>> {
  using Raw = std::underlying_type_t<T>;
  static constexpr bool enabled = true;
  static void Write(Stream* out, const T& v) { serial_detail::PutScalar<Raw>(out, static_cast<Raw>(v)); }
  static bool Read(Stream* in, T* v) {
    Raw raw;
    if (!serial_detail::GetScalar<Raw>(in, &raw)) return false;
    *v = static_cast<T>(raw);
    return true;
  }
};

template <>
struct Serializer<std::string> {
  static constexpr bool enabled = true;
  static void Write(Stream* out, const std::string& s) { serial_detail::PutChars(out, s.data(), s.size()); }
  static bool Read(Stream* in, std::string* s) { return serial_detail::GetChars(in, s); }
};

template <>
struct Serializer<ffi::String> {
  static constexpr bool enabled = true;
  static void Write(Stream* out, const ffi::String& s) { serial_detail::PutChars(out, s.data(), s.size()); }
  static bool Read(Stream* in, ffi::String* s) {
    std::string tmp;
    if (!serial_detail::GetChars(in, &tmp)) return false;
    *s = ffi::String(std::move(tmp));
    return true;
  }
};

template <typename A, typename B>
struct Serializer<std::pair<A, B>> {
  static constexpr bool enabled = true;
  static void Write(Stream* out, const std::pair<A, B>& p) {
    Serializer<A>::Write(out, p.first);
    Serializer<B>::Write(out, p.second);
  }
  static bool Read(Stream* in, std::pair<A, B>* p) {
    return Serializer<A>::Read(in, &p->first) && Serializer<B>::Read(in, &p->second);
  }
};

template <typename T>
struct Serializer<std::vector<T>> {
  static constexpr bool enabled = true;
  static void Write(Stream* out, const std::vector<T>& items) {
    serial_detail::PutCount(out, items.size());
    for (const T& item : items) Serializer<T>::Write(out, item);
  }
  static bool Read(Stream* in, std::vector<T>* items) {
    size_t n = 0;
    if (!serial_detail::GetCount(in, &n)) return false;
    items->clear();
    items->reserve(n);
    for (size_t i = 0; i < n; ++i) {
      T item{};
      if (!Serializer<T>::Read(in, &item)) return false;
      items->push_back(std::move(item));
    }
    return true;
  }
};

template <typename K, typename V>
struct Serializer<std::unordered_map<K, V>> {
  static constexpr bool enabled = true;
  static void Write(Stream* out, const std::unordered_map<K, V>& map) {
    serial_detail::PutCount(out, map.size());
    for (const auto& kv : map) {
      Serializer<K>::Write(out, kv.first);
      Serializer<V>::Write(out, kv.second);
    }
  }
  static bool Read(Stream* in, std::unordered_map<K, V>* map) {
    size_t n = 0;
    if (!serial_detail::GetCount(in, &n)) return false;
    map->clear();
    for (size_t i = 0; i < n; ++i) {
      K key{};
      V value{};
      if (!Serializer<K>::Read(in, &key) || !Serializer<V>::Read(in, &value)) return false;
      (*map)[std::move(key)] = std::move(value);
    }
    return true;
  }
};

template <typename T>
struct Serializer<ffi::Array<T>> {
  static constexpr bool enabled = true;
  static void Write(Stream* out, const ffi::Array<T>& items) {
    serial_detail::PutCount(out, items.size());
    for (const T& item : items) Serializer<T>::Write(out, item);
  }
  static bool Read(Stream* in, ffi::Array<T>* items) {
    size_t n = 0;
    if (!serial_detail::GetCount(in, &n)) return false;
    ffi::Array<T> result;
    for (size_t i = 0; i < n; ++i) {
      T item;
      if (!Serializer<T>::Read(in, &item)) return false;
      result.push_back(std::move(item));
    }
    *items = std::move(result);
    return true;
  }
};

template <typename K, typename V>
struct Serializer<ffi::Map<K, V>> {
  static constexpr bool enabled = true;
  static void Write(Stream* out, const ffi::Map<K, V>& map) {
    serial_detail::PutCount(out, map.size());
    for (const auto& kv : map) {
      Serializer<K>::Write(out, kv.first);
      Serializer<V>::Write(out, kv.second);
    }
  }
  static bool Read(Stream* in, ffi::Map<K, V>* map) {
    size_t n = 0;
    if (!serial_detail::GetCount(in, &n)) return false;
    ffi::Map<K, V> result;
    for (size_t i = 0; i < n; ++i) {
      K key;
      V value;
      if (!Serializer<K>::Read(in, &key) || !Serializer<V>::Read(in, &value)) return false;
      result.Set(std::move(key), std::move(value));
    }
    *map = std::move(result);
    return true;
  }
};

template <>
struct Serializer<DLDataType> {
  static constexpr bool enabled = true;
  static void Write(Stream* out, const DLDataType& t) {
    serial_detail::PutScalar<uint8_t>(out, t.code);
    serial_detail::PutScalar<uint8_t>(out, t.bits);
    serial_detail::PutScalar<uint16_t>(out, t.lanes);
  }
  static bool Read(Stream* in, DLDataType* t) {
    return serial_detail::GetScalar<uint8_t>(in, &t->code) &&
           serial_detail::GetScalar<uint8_t>(in, &t->bits) &&
           serial_detail::GetScalar<uint16_t>(in, &t->lanes);
  }
};

template <>
struct Serializer<DLDevice> {
  static constexpr bool enabled = true;
  static void Write(Stream* out, const DLDevice& d) {
    serial_detail::PutScalar<int32_t>(out, static_cast<int32_t>(d.device_type));
    serial_detail::PutScalar<int32_t>(out, d.device_id);
  }
  static bool Read(Stream* in, DLDevice* d) {
    int32_t kind = 0;
    if (!serial_detail::GetScalar<int32_t>(in, &kind)) return false;
    d->device_type = static_cast<DLDeviceType>(kind);
    return serial_detail::GetScalar<int32_t>(in, &d->device_id);
  }
};

}  // namespace support
}  // namespace tvm

#endif  // EDGESMITH_TVM_SUPPORT_SERIALIZER_H_
