// Branch-free exp / log1p / softplus / sigmoid that GCC and Clang auto-vectorise.
//
// libm's expf / log1pf are calls, so a loop that uses them stays scalar; these are written with
// arithmetic, selects and integer bit operations only, so a `#pragma omp simd` loop over them
// becomes SIMD code (SSE2, AVX2 + FMA, NEON: whatever the translation unit is compiled for).
//
// Included only from kernels_impl.h, inside an ISA-specific namespace and an anonymous
// namespace, so every translation unit gets its own internal copy (no symbol is shared between
// the baseline and the AVX2 objects; see kernels_impl.h). Hence no #include and no #pragma once
// here: kernels_impl.h includes <cstdint> before it opens those namespaces.
//
// Accuracy: exp_nonpos and log_1_2 are within a few ulp in float and double over the ranges
// they are used on (the truncation terms are below 0.1 ulp; the rest is Horner rounding).
template <typename T>
struct MathConsts;

template <>
struct MathConsts<float> {
  using Bits = std::int32_t;
  // exp(x) for x below this is replaced by exp(kExpMin), about 1.6e-38: still a normal float,
  // and the absolute error (< 2e-38) is invisible next to the 1 it is added to.
  static constexpr float kExpMin = -87.0f;
  static constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: x + magic rounds x to an int
  static constexpr int kMantissaBits = 23;
  static constexpr Bits kExpBias = 127;
};

template <>
struct MathConsts<double> {
  using Bits = std::int64_t;
  static constexpr double kExpMin = -708.0;
  static constexpr double kRoundMagic = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr int kMantissaBits = 52;
  static constexpr Bits kExpBias = 1023;
};

template <typename To, typename From>
inline To bit_cast_(From v) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast_ needs equal sizes");
  To out;
  __builtin_memcpy(&out, &v, sizeof(To));
  return out;
}

// sum_{i < Count} c[Off + i] x^i by Estrin's scheme: split at the largest power of two below
// Count, lo + x^split * hi, recursively. A dependency chain of depth log2(N) instead of
// Horner's N: these kernels are latency-bound (a softplus chains an exp, a division and a log),
// and a shorter chain lets the out-of-order core overlap more loop iterations.
template <int Off, int Count, typename T, int N>
inline T estrin(T x, const T (&c)[N], T x2, T x4, T x8) {
  static_assert(Count >= 1 && Count <= 16 && Off + Count <= N, "estrin: coefficients out of range");
  if constexpr (Count == 1) {
    return c[Off];
  } else if constexpr (Count == 2) {
    return c[Off] + c[Off + 1] * x;
  } else if constexpr (Count <= 4) {
    return estrin<Off, 2>(x, c, x2, x4, x8) + x2 * estrin<Off + 2, Count - 2>(x, c, x2, x4, x8);
  } else if constexpr (Count <= 8) {
    return estrin<Off, 4>(x, c, x2, x4, x8) + x4 * estrin<Off + 4, Count - 4>(x, c, x2, x4, x8);
  } else {
    return estrin<Off, 8>(x, c, x2, x4, x8) + x8 * estrin<Off + 8, Count - 8>(x, c, x2, x4, x8);
  }
}

// sum_i c[i] x^i, c[0] first.
template <typename T, int N>
inline T poly(T x, const T (&c)[N]) {
  const T x2 = x * x, x4 = x2 * x2, x8 = x4 * x4;
  return estrin<0, N>(x, c, x2, x4, x8);
}

// Taylor coefficients 1/k! of exp on |r| <= ln2 / 2; degree 7 (float) / 13 (double) puts the
// truncation error below 0.1 ulp.
template <typename T>
struct ExpPoly;
template <>
struct ExpPoly<float> {
  static constexpr float c[8] = {1.0f, 1.0f, 0.5f, 1.0f / 6, 1.0f / 24, 1.0f / 120, 1.0f / 720, 1.0f / 5040};
};
template <>
struct ExpPoly<double> {
  static constexpr double c[14] = {
      1.0, 1.0, 0.5, 1.0 / 6, 1.0 / 24, 1.0 / 120, 1.0 / 720, 1.0 / 5040, 1.0 / 40320,
      1.0 / 362880, 1.0 / 3628800, 1.0 / 39916800, 1.0 / 479001600, 1.0 / 6227020800.0};
};

template <typename T>
struct Ln2 {
  // Cody-Waite split: kHi has trailing zero bits, so n * kHi is exact for the n used here.
  static constexpr T kHi = static_cast<T>(0.693145751953125);
  static constexpr T kLo = static_cast<T>(1.42860682030941723212e-6);
  static constexpr T kLog2e = static_cast<T>(1.44269504088896340736);
  static constexpr T kValue = static_cast<T>(0.693147180559945309417);
};

// exp(x) for x <= 0 (every caller passes -|y|); NaN propagates.
template <typename T>
inline T exp_nonpos(T x) {
  using C = MathConsts<T>;
  using Bits = typename C::Bits;
  x = x < C::kExpMin ? C::kExpMin : x;
  const T shifted = x * Ln2<T>::kLog2e + C::kRoundMagic;
  const T n = shifted - C::kRoundMagic;  // round(x / ln 2), exactly representable
  T r = x - n * Ln2<T>::kHi;
  r = r - n * Ln2<T>::kLo;
  const Bits ni = bit_cast_<Bits>(shifted) - bit_cast_<Bits>(C::kRoundMagic);
  const T scale = bit_cast_<T>(static_cast<Bits>((ni + C::kExpBias) << C::kMantissaBits));
  return poly(r, ExpPoly<T>::c) * scale;
}

// log(u) for u in [1, 2], float: Cephes' logf polynomial on m - 1, m = u or u / 2 in
// [sqrt(1/2), sqrt(2)], about 1 ulp and free of divisions.
inline float log_1_2(float u) {
  const bool big = u > 1.41421356f;
  const float x = big ? u * 0.5f - 1.0f : u - 1.0f;  // exact (Sterbenz)
  const float z = x * x;
  const float p[9] = {3.3333331174e-1f, -2.4999993993e-1f, 2.0000714765e-1f, -1.6668057665e-1f, 1.4249322787e-1f,
                      -1.2420140846e-1f, 1.1676998740e-1f, -1.1514610310e-1f, 7.0376836292e-2f};
  float y = poly(x, p) * x * z - 0.5f * z;
  const float e = big ? 1.0f : 0.0f;
  y += e * -2.12194440e-4f;
  return (x + y) + e * 0.693359375f;
}

// log(u) for u in [1, 2], double: 2 atanh(s), s = (m - 1) / (m + 1) in [-0.172, 0.172], with the
// series sum_i s^(2i) / (2i + 1) to degree 20 (truncation below 1e-18).
inline double log_1_2(double u) {
  const bool big = u > 1.41421356237309504880;
  const double m = big ? u * 0.5 : u;
  const double s = (m - 1.0) / (m + 1.0);
  const double c[11] = {1.0,      1.0 / 3,  1.0 / 5,  1.0 / 7,  1.0 / 9, 1.0 / 11,
                        1.0 / 13, 1.0 / 15, 1.0 / 17, 1.0 / 19, 1.0 / 21};
  return (big ? Ln2<double>::kValue : 0.0) + 2.0 * s * poly(s * s, c);
}

// softplus(x) = log(1 + e^x) = max(x, 0) + log1p(t) and sigmoid(x) = (x >= 0 ? 1 : t) / (1 + t),
// t = e^-|x|, sharing the exp and the division. log1p(t) = log(u) + lost / u with u = 1 + t
// rounded and lost = t - (u - 1) the part of t that the rounding dropped (exact). Above 20,
// softplus(x) = x, as torch.nn.functional.softplus (its threshold), so that the step agrees with
// the reference to rounding; sigmoid, the derivative, stays exact (as reference.linearize).
template <typename T>
inline void softplus_sigmoid(T x, T& sp, T& sig) {
  const T ax = x < T(0) ? -x : x;
  const T t = exp_nonpos(-ax);
  const T u = T(1) + t;
  const T d = T(1) / u;
  sig = x >= T(0) ? d : t * d;
  const T smooth = (x > T(0) ? x : T(0)) + (log_1_2(u) + (t - (u - T(1))) * d);
  sp = x > T(20) ? x : smooth;
}

template <typename T>
inline T softplus(T x) {
  T sp, sig;
  softplus_sigmoid(x, sp, sig);
  return sp;
}

template <typename T>
inline T sigmoid(T x) {
  const T ax = x < T(0) ? -x : x;
  const T t = exp_nonpos(-ax);
  const T d = T(1) / (T(1) + t);
  return x >= T(0) ? d : t * d;
}
