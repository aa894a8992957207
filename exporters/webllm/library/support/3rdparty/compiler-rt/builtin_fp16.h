// edgesmith: a stand-in for TVM's 3rdparty/compiler-rt/builtin_fp16.h (not shipped in the
// apache-tvm wheel): IEEE-754 binary conversions between formats, used by the runtime's sort
// (half -> float) and fp16 helpers (float/double -> half). Written for edgesmith from the template
// signature the including code calls; Apache-2.0, like TVM.
//
// Template parameters: the source value type, its same-width unsigned integer type and its number
// of stored significand bits, then the same three for the destination. Narrowing rounds to nearest,
// ties to even; NaN stays NaN (quieted); values beyond the destination's range become infinity.
#ifndef EDGESMITH_TVM_BUILTIN_FP16_H_
#define EDGESMITH_TVM_BUILTIN_FP16_H_

#include <cstdint>
#include <cstring>

namespace edgesmith_fp {
template <typename Rep, int SigBits>
struct Layout {
  static constexpr int kBits = int(sizeof(Rep)) * 8;
  static constexpr int kExpBits = kBits - SigBits - 1;
  static constexpr int kInfExp = (1 << kExpBits) - 1;
  static constexpr int kBias = kInfExp >> 1;
  static constexpr Rep kSigMask = (Rep(1) << SigBits) - 1;
};

template <typename To, typename From>
inline To BitCast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "same width");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

// Shift `sig` right by `sh` bits, rounding to nearest, ties to even.
template <typename Rep>
inline Rep ShiftRound(Rep sig, int sh) {
  if (sh <= 0) return sig;
  if (sh >= int(sizeof(Rep)) * 8) return 0;
  Rep kept = sig >> sh;
  Rep rest = sig & ((Rep(1) << sh) - 1);
  Rep half = Rep(1) << (sh - 1);
  if (rest > half || (rest == half && (kept & 1))) ++kept;
  return kept;
}
}  // namespace edgesmith_fp

// Narrow: e.g. float -> half.
template <typename SRC_T, typename SRC_REP_T, int SRC_SIG_BITS, typename DST_T, typename DST_REP_T,
          int DST_SIG_BITS>
static inline DST_T __truncXfYf2__(SRC_T a) {
  using S = edgesmith_fp::Layout<SRC_REP_T, SRC_SIG_BITS>;
  using D = edgesmith_fp::Layout<DST_REP_T, DST_SIG_BITS>;
  constexpr int kDrop = SRC_SIG_BITS - DST_SIG_BITS;
  const SRC_REP_T bits = edgesmith_fp::BitCast<SRC_REP_T>(a);
  const DST_REP_T sign = DST_REP_T(bits >> (S::kBits - 1)) << (D::kBits - 1);
  const int exp = int((bits >> SRC_SIG_BITS) & SRC_REP_T(S::kInfExp));
  const SRC_REP_T frac = bits & S::kSigMask;
  const DST_REP_T inf = DST_REP_T(D::kInfExp) << DST_SIG_BITS;
  DST_REP_T out;
  if (exp == S::kInfExp) {  // infinity, or NaN (kept a NaN by setting the quiet bit)
    out = frac == 0 ? inf : DST_REP_T(inf | DST_REP_T(frac >> kDrop) | (DST_REP_T(1) << (DST_SIG_BITS - 1)));
  } else if (exp == 0) {  // zero or a source subnormal: far below the destination's range
    out = 0;
  } else {
    const int e = exp - S::kBias + D::kBias;  // destination biased exponent
    const SRC_REP_T sig = frac | (SRC_REP_T(1) << SRC_SIG_BITS);
    if (e >= D::kInfExp) {
      out = inf;
    } else if (e > 0) {  // normal; a rounding carry moves into the exponent (up to infinity)
      out = DST_REP_T((DST_REP_T(e) << DST_SIG_BITS) + DST_REP_T(edgesmith_fp::ShiftRound(frac, kDrop)));
    } else {  // subnormal or zero; rounding up to the smallest normal works through the carry
      out = DST_REP_T(edgesmith_fp::ShiftRound(sig, kDrop + 1 - e));
    }
  }
  return edgesmith_fp::BitCast<DST_T>(DST_REP_T(out | sign));
}

// Widen (exact): e.g. half -> float.
template <typename SRC_T, typename SRC_REP_T, int SRC_SIG_BITS, typename DST_T, typename DST_REP_T,
          int DST_SIG_BITS>
static inline DST_T __extendXfYf2__(SRC_T a) {
  using S = edgesmith_fp::Layout<SRC_REP_T, SRC_SIG_BITS>;
  using D = edgesmith_fp::Layout<DST_REP_T, DST_SIG_BITS>;
  constexpr int kAdd = DST_SIG_BITS - SRC_SIG_BITS;
  const SRC_REP_T bits = edgesmith_fp::BitCast<SRC_REP_T>(a);
  const DST_REP_T sign = DST_REP_T(bits >> (S::kBits - 1)) << (D::kBits - 1);
  const int exp = int((bits >> SRC_SIG_BITS) & SRC_REP_T(S::kInfExp));
  DST_REP_T frac = DST_REP_T(bits & S::kSigMask);
  DST_REP_T out;
  if (exp == S::kInfExp) {
    out = (DST_REP_T(D::kInfExp) << DST_SIG_BITS) | (frac << kAdd);
  } else if (exp == 0 && frac == 0) {
    out = 0;
  } else {
    int e = exp - S::kBias + D::kBias;
    if (exp == 0) {  // source subnormal: normalise
      e = 1 - S::kBias + D::kBias;
      while ((frac & (DST_REP_T(1) << SRC_SIG_BITS)) == 0) {
        frac <<= 1;
        --e;
      }
      frac &= DST_REP_T(S::kSigMask);
    }
    out = (DST_REP_T(e) << DST_SIG_BITS) | (frac << kAdd);
  }
  return edgesmith_fp::BitCast<DST_T>(DST_REP_T(out | sign));
}

#endif  // EDGESMITH_TVM_BUILTIN_FP16_H_
