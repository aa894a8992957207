// edgesmith: a stand-in for TVM's src/support/utils.h (not shipped in the apache-tvm wheel), with
// only the string helpers the web runtime's sources call. Written for edgesmith; Apache-2.0.
#ifndef EDGESMITH_TVM_SRC_SUPPORT_UTILS_H_
#define EDGESMITH_TVM_SRC_SUPPORT_UTILS_H_

#include <algorithm>
#include <cctype>
#include <cstring>
#include <string>
#include <vector>

namespace tvm {
namespace support {

inline bool StartsWith(const std::string& text, const char* prefix) {
  size_t n = std::strlen(prefix);
  return text.size() >= n && text.compare(0, n, prefix) == 0;
}

inline bool EndsWith(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() &&
         text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// True for a non-empty run of decimal digits.
inline bool IsNumber(const std::string& text) {
  return !text.empty() &&
         std::all_of(text.begin(), text.end(), [](unsigned char c) { return std::isdigit(c) != 0; });
}

inline std::vector<std::string> Split(const std::string& text, char sep) {
  std::vector<std::string> parts;
  size_t start = 0;
  for (size_t i = 0; i <= text.size(); ++i) {
    if (i == text.size() || text[i] == sep) {
      parts.push_back(text.substr(start, i - start));
      start = i + 1;
    }
  }
  return parts;
}

}  // namespace support
}  // namespace tvm

#endif  // EDGESMITH_TVM_SRC_SUPPORT_UTILS_H_
