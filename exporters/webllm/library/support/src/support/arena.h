// edgesmith: a stand-in for TVM's src/support/arena.h (not shipped in the apache-tvm wheel): a bump
// allocator for trivially-copyable scratch arrays that are all released at once. Written for
// edgesmith from what the runtime sources call (allocate_<T>(n), RecycleAll()); Apache-2.0.
#ifndef EDGESMITH_TVM_SRC_SUPPORT_ARENA_H_
#define EDGESMITH_TVM_SRC_SUPPORT_ARENA_H_

#include <cstddef>
#include <memory>
#include <type_traits>
#include <vector>

namespace tvm {
namespace support {

class Arena {
 public:
  Arena() = default;
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;

  // Uninitialised, suitably aligned room for `count` objects of a trivial type T, valid until the
  // next RecycleAll() or the arena's destruction.
  template <typename T>
  T* allocate_(size_t count = 1) {
    static_assert(std::is_trivially_destructible<T>::value, "arena memory is never destructed");
    static_assert(alignof(T) <= alignof(std::max_align_t), "blocks are max_align_t aligned");
    return static_cast<T*>(Allocate(sizeof(T) * count, alignof(T)));
  }

  // Forget every allocation; the blocks are kept and reused.
  void RecycleAll() {
    current_ = 0;
    used_ = 0;
  }

 private:
  struct Block {
    std::unique_ptr<std::max_align_t[]> data;
    size_t size;  // bytes
  };
  static constexpr size_t kBlockBytes = 64 * 1024;

  void* Allocate(size_t bytes, size_t align) {
    if (align < alignof(std::max_align_t)) align = alignof(std::max_align_t);
    while (current_ < blocks_.size()) {
      size_t start = (used_ + align - 1) / align * align;
      if (start + bytes <= blocks_[current_].size) {
        used_ = start + bytes;
        return reinterpret_cast<char*>(blocks_[current_].data.get()) + start;
      }
      ++current_;
      used_ = 0;
    }
    size_t size = bytes > kBlockBytes ? bytes : kBlockBytes;
    size_t cells = (size + sizeof(std::max_align_t) - 1) / sizeof(std::max_align_t);
    blocks_.push_back(Block{std::unique_ptr<std::max_align_t[]>(new std::max_align_t[cells]),
                            cells * sizeof(std::max_align_t)});
    current_ = blocks_.size() - 1;
    used_ = bytes;
    return blocks_.back().data.get();
  }

  std::vector<Block> blocks_;
  size_t current_ = 0;  // index of the block being filled
  size_t used_ = 0;     // bytes used in that block
};

}  // namespace support
}  // namespace tvm

#endif  // EDGESMITH_TVM_SRC_SUPPORT_ARENA_H_
