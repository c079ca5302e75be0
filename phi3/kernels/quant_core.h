// The CPU kernels' arithmetic, without PyTorch: products with weights in llama.cpp's 4- to 8-bit
// block formats, their dequantization, RMSNorm and one-token attention, on raw pointers and one
// range of rows per call, single-threaded. quant_cpu.cpp binds them to torch (tensor checks, rows
// split across threads); test_core.cpp drives them directly, on ARM too (under qemu).
//
// Why our own kernel: decoding reads every weight once per token, so bytes per weight set the
// speed. PyTorch's int4 CPU kernel (_weight_int4pack_mm_for_cpu) moves ~18 GB/s at one row on
// this machine's shapes and needs bfloat16 activations; with float32 it is ~30x slower.
//
// Layout, repacked from GGUF at load, for an [N, K] weight in blocks of 32 along K (nb = K/32):
//   qs  q4 formats: [N, K/2] uint8; block b of a row is bytes 16b..16b+15, the low nibble of byte
//       j is element j and the high nibble element j+16 (Q4_0's order). q8_0: [N, K] int8.
//   q4_0  a = d [N, nb] half                                  w = d*q - 8d
//   q4_1  a = d [N, nb] half, b = m [N, nb] half              w = d*q + m
//   q4_k  a = sc [N, nb] uint8, b = mn [N, nb] uint8,
//         c = [N, nb/8, 2] half (d, dmin per 256)             w = d*sc*q - dmin*mn
//   q8_0  a = d [N, nb] half                                  w = d*q
// Every format reduces to a float scale and min per block (row_scales), so one inner loop serves
// all of them and the file's bytes are what is read.
//
// The "wide" formats (5- and 6-bit codes, IQ4's non-linear levels) keep the q4 nibbles in qs, plus
//   qh  the high bits, per block: q5_*: 4 bytes, one 32-bit little-endian plane (bit e = bit 4 of
//       element e); q6_k: 8 bytes, two bits per element: element 8k + i in bits 2k, 2k+1 of byte i
//       (bits 4 and 5 of its code). q6_k's pairs expand with one 64-bit shift per 8 elements: byte i
//       of 64-bit lane k is byte i shifted by 4 - 2k, masked to bits 4..5 (q6_high_bits). Two bit
//       planes, as q5 has, took a shuffle, an or and a compare per plane and 32 codes (q6_k decoded
//       at 2.5x a q4_k matrix's time for 1.46x its bytes).
//   q5_0  a = d half                                          w = d*(q-16)
//   q5_1  a = d half, b = m half                              w = d*q + m
//   q5_k  as q4_k                                             w = d*sc*q - dmin*mn
//   q6_k  a = int8 scale per 16 [N, 2nb], c = d [N, nb/8] half  w = d*sc*(q-32)
//   iq4_nl a = d half                                         w = d*L[q]
//   iq4_xs a = int8 (ls-32) [N, nb], c = d [N, nb/8] half      w = d*(ls-32)*L[q]
// (L = kIq4Levels). Each build unpacks a block to 32 signed int8 codes and reuses the signed
// int8 dot product; see "The 5-, 6-bit and IQ4 formats" below.
//
// Two ways to multiply:
//   int8 activations (the default, llama.cpp's method): x is rounded to int8 per block of 32 with
//     a half-precision scale, and the codes' products are summed in integers (AVX-512 VNNI
//     vpdpbusd, AVX2 vpmaddubsw or AVX-VNNI, NEON sdot). Memory-bound at one row.
//   float activations (exact): codes are widened to float and multiplied with float x, giving
//     the dequantized reference's numbers up to summation order. ~3x slower.
// Products are accumulated in float32: y[m, n] = sum_b scale_b * (sum_j q_j x_j) + min_b * sum_j x_j.
//
// One instruction set per build, chosen by the compiler flags: AVX-512 VNNI, AVX2 (+FMA, F16C;
// AVX-VNNI where enabled), NEON on aarch64 (sdot where the dot-product extension is enabled), else
// plain C++. The plain C++ functions are compiled in every build as phi3::ref, the reference the
// SIMD paths are tested against; phi3::isa names the build's own.
//
// What every build keeps: activations round to the same int8 codes and scales, and a row's result
// does not depend on how many rows share the call (a server batching requests gives each the
// numbers it would get alone), because the many-row paths do, per row, the float operations of
// the one-row path in its order.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#if defined(__aarch64__)
#include <arm_neon.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && \
    defined(__AVX512VNNI__) && defined(__FMA__) && defined(__F16C__)
#define PHI3_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define PHI3_AVX2 1
#elif defined(__aarch64__) && defined(__ARM_NEON)
#define PHI3_NEON 1
#endif

namespace phi3 {

constexpr int64_t kBlock = 32;
enum Format : int64_t { Q4_0 = 0, Q4_1 = 1, Q4_K = 2, Q8_0 = 3, Q5_0 = 4, Q5_1 = 5, Q5_K = 6, Q6_K = 7, IQ4_NL = 8, IQ4_XS = 9 };

// llama.cpp's kvalues_iq4nl: the 16 levels of IQ4_NL and IQ4_XS codes.
alignas(16) constexpr int8_t kIq4Levels[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Decoding prefetches the weight stream this far ahead: the hardware prefetcher alone leaves
// long rows behind (phi-3-medium's down projection, K = 17920, streamed at 28-30 GB/s on 2 threads
// without it and 34-39 with it; rows of K <= 8192 are unchanged; 2 KB ahead was too short).
// Into L2, not L1: weights are read once, and fetched into L1 8 KB early they evict the
// activations and scales that each row rereads (whole-model phi-3-mini decode 14.4 -> 15.8 tok/s,
// the medium down projection 21 -> 33 GB/s, other shapes unchanged; measured A/B, 2026-12-01).
constexpr int64_t kPrefetchAhead = 8192;

// --- 16-bit floats --------------------------------------------------------------------------------

struct half { uint16_t bits; };  // IEEE binary16, PyTorch's float16
struct bf16 { uint16_t bits; };  // bfloat16: the top half of a float32

inline float float_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline uint32_t shift_right_to_nearest_even(uint32_t v, int shift) {
  const uint32_t kept = v >> shift, rest = v & ((1u << shift) - 1), halfway = 1u << (shift - 1);
  return kept + (rest > halfway || (rest == halfway && (kept & 1)));
}

// Exact conversions in integer arithmetic: for CPUs without conversion instructions, and the
// reference those instructions are tested against.
inline float scalar_half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF;
  if (exponent == 0x1F) return float_from_bits(sign | 0x7F800000 | (mantissa << 13));  // inf, NaN
  if (exponent != 0) return float_from_bits(sign | ((exponent + 112) << 23) | (mantissa << 13));
  return float_from_bits(sign | bits_of(static_cast<float>(mantissa) * 0x1p-24f));  // zero, subnormal
}

inline uint16_t scalar_float_to_half(float f) {  // round to nearest even, as PyTorch does
  const uint32_t x = bits_of(f);
  const uint16_t sign = (x >> 16) & 0x8000;
  const uint32_t ax = x & 0x7FFFFFFF;
  if (ax > 0x7F800000) return sign | 0x7E00;                 // NaN
  if (ax >= 0x477FF000) return sign | 0x7C00;                // 65520 and up round to inf
  if (ax >= 0x38800000)                                      // normal: rebias 127 -> 15
    return sign | static_cast<uint16_t>(shift_right_to_nearest_even(ax, 13) - (112 << 10));
  const int exponent = ax >> 23;
  if (exponent < 102) return sign;                           // below 2^-25: rounds to zero
  const uint32_t mantissa = (ax & 0x7FFFFF) | 0x800000;      // subnormal: units of 2^-24
  return sign | static_cast<uint16_t>(shift_right_to_nearest_even(mantissa, 126 - exponent));
}

inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#elif defined(__aarch64__)
  __fp16 v;
  std::memcpy(&v, &h, sizeof v);
  return v;
#else
  return scalar_half_to_float(h);
#endif
}

inline uint16_t float_to_half(float f) {
#if defined(__F16C__)
  return _cvtss_sh(f, 0);  // 0: round to nearest even
#elif defined(__aarch64__)
  const __fp16 v = f;
  uint16_t h;
  std::memcpy(&h, &v, sizeof h);
  return h;
#else
  return scalar_float_to_half(f);
#endif
}

// Round to nearest even, NaN to the canonical quiet NaN: PyTorch's float -> bfloat16.
inline uint16_t float_to_bf16(float f) {
  if (std::isnan(f)) return 0x7FC0;
  const uint32_t u = bits_of(f);
  return static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

inline float to_float(float v) { return v; }
inline float to_float(bf16 v) { return float_from_bits(static_cast<uint32_t>(v.bits) << 16); }
inline float to_float(half v) { return half_to_float(v.bits); }

template <typename T> T from_float(float v);
template <> inline float from_float<float>(float v) { return v; }
template <> inline bf16 from_float<bf16>(float v) { return {float_to_bf16(v)}; }
template <> inline half from_float<half>(float v) { return {float_to_half(v)}; }

// --- Operands -------------------------------------------------------------------------------------

struct Weight {
  int64_t fmt, N, K, nb;
  const uint8_t* qs;
  const uint16_t* d;    // half, q4_0/q4_1/q8_0
  const uint16_t* m;    // half, q4_1
  const uint8_t* sc;    // q4_k sub-block scales
  const uint8_t* mn;    // q4_k sub-block mins
  const uint16_t* dm;   // q4_k (d, dmin) per super-block
  const uint8_t* qh;    // 5- and 6-bit formats: the high-bit planes
  bool q4() const { return fmt != Q8_0; }
  int64_t row_bytes() const { return q4() ? K / 2 : K; }
  bool wide() const { return fmt >= Q5_0; }        // the formats of the unpack-then-dot path below
  int64_t qh_bytes() const { return qh_bytes_of(fmt); }
  static constexpr int64_t qh_bytes_of(int64_t f) { return f == Q6_K ? 8 : f == Q5_0 || f == Q5_1 || f == Q5_K ? 4 : 0; }
};

// Activations rounded to int8 per block of 32, as llama.cpp's quantize_row_q8_0 does: scale
// d = amax/127 (stored as half), codes round(x * (1/d)), half to even. Each instruction set keeps
// the codes in its own order (activation_code reads one back).
struct QuantizedRows {
  int64_t M, nb, nbp, row_q;   // rows, blocks per row, scale entries per row, code bytes per row
  std::vector<uint8_t> q;      // per row: row_q bytes
  std::vector<float> dx;       // per row: nbp block scales (zero-padded)
  std::vector<float> xs;       // per row: nbp block sums, dx * sum(q)
};

// Float activations [M, K] for the exact path, with their block sums.
struct FloatRows {
  const float* x;
  int64_t M, K, nbp;
  std::vector<float> sums;     // per row: nbp block sums (zero-padded)
};

// --- Shared by every build: small decoding ops, scalar ----------------------------------------------

// RMSNorm of rows [r_begin, r_end) of x [rows, D], float32 math whatever the storage type.
template <typename T>
void rms_norm_rows(const T* x, const T* w, T* y, int64_t D, float eps, int64_t r_begin, int64_t r_end) {
  for (int64_t r = r_begin; r < r_end; ++r) {
    const T* xr = x + r * D;
    double ss = 0.0;  // double: the reference's vectorised float sum is closer to exact than a serial one
    for (int64_t i = 0; i < D; ++i) { double v = to_float(xr[i]); ss += v * v; }
    const float inv = 1.f / std::sqrt(static_cast<float>(ss / D) + eps);
    T* yr = y + r * D;
    for (int64_t i = 0; i < D; ++i) yr[i] = from_float<T>(to_float(xr[i]) * inv * to_float(w[i]));
  }
}

// Rotary embedding of one head (rotate-half convention, cos/sin already scaled).
template <typename T>
void rotate_into(const T* x, const T* cos, const T* sin, int64_t hd, T* out) {
  const int64_t half = hd / 2;
  for (int64_t d = 0; d < half; ++d) {
    // Round each product as the reference's separate multiplies do.
    T a = from_float<T>(to_float(x[d]) * to_float(cos[d]));
    T b = from_float<T>(-to_float(x[d + half]) * to_float(sin[d]));
    out[d] = from_float<T>(to_float(a) + to_float(b));
    T c = from_float<T>(to_float(x[d + half]) * to_float(cos[d + half]));
    T e = from_float<T>(to_float(x[d]) * to_float(sin[d + half]));
    out[d + half] = from_float<T>(to_float(c) + to_float(e));
  }
}

// A new token's key (rotated) or value into its cache slot, rounded to the cache's type C as
// PyTorch's copy into a float16 cache rounds it (so decoding and prefill cache the same bits).
template <typename T, typename C>
void write_slot(const T* x, const T* cos, const T* sin, int64_t hd, bool rotate, C* slot) {
  if constexpr (std::is_same_v<T, C>) {
    if (rotate) rotate_into(x, cos, sin, hd, slot);
    else std::copy(x, x + hd, slot);
  } else {
    T tmp[128];  // hd <= 128, checked by the callers
    const T* src = x;
    if (rotate) { rotate_into(x, cos, sin, hd, tmp); src = tmp; }
    for (int64_t d = 0; d < hd; ++d) slot[d] = from_float<C>(to_float(src[d]));
  }
}

// --- The 5-, 6-bit and IQ4 formats: unpack a block to 32 int8 codes, then a signed dot product --
// Each block of 32 has a scale (q6_k: one per 16 codes) and a min (q5_1, q5_k; else 0). Codes are signed: q5_0 q - 16, q6_k q - 32, iq4 their levels.
// One driver per operation serves every build; an instruction set gives a traits struct V with
//   C codes<F>(row, qh, b)                  block b's 32 codes
//   Acc dot<F>(acc, C, xq, sd)              + the int8 products (activations in natural order,
//                                           signed) times sd[0], or for q6_k sd[0] (codes 0..15)
//                                           and sd[1] (16..31)
//   FAcc fdot(acc, C, x, s_lo, s_hi)        + the float products
//   store(T* out, C, s_lo, s_hi, min)       the dequantized block
// The format is a template argument so that each codes<F> compiles to its own straight line.
// Decoding alternates two accumulators (even and odd blocks): one chain of dependent FMAs held
// q6_k at 2.7 ns a block on one Zen 5 thread. The many-row paths do the same per row, so a row's
// result does not depend on how many rows share the call.

constexpr bool has_min(int64_t fmt) { return fmt == Q5_1 || fmt == Q5_K; }
constexpr int wide_offset(int64_t fmt) { return fmt == Q5_0 ? 16 : fmt == Q6_K ? 32 : 0; }
constexpr bool is_iq4(int64_t fmt) { return fmt == IQ4_NL || fmt == IQ4_XS; }

// Scales per block: q6_k two (codes 0..15, 16..31), the others one.
constexpr int64_t halves(int64_t fmt) { return fmt == Q6_K ? 2 : 1; }

inline void halves_to_floats(const uint16_t* h, float* out, int64_t count) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= count; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
#endif
  for (; i < count; ++i) out[i] = half_to_float(h[i]);
}

// Row n's block scales s[halves(F) * b + h] and mins mw[b]. Loops per super-block: computed
// block by block (a half conversion and an index division each) they took half of q6_k's and
// iq4_xs's decoding time.
template <int64_t F>
void wide_scales(const Weight& w, int64_t n, float* s, float* mw) {
  const int64_t nb = w.nb, first = n * nb;
  if constexpr (F == Q5_K || F == Q6_K || F == IQ4_XS) {
    constexpr int64_t per = 8 * halves(F);  // scales per super-block of 8 blocks
    for (int64_t g = 0; g < nb / 8; ++g) {
      const int64_t sb = first / 8 + g;
      const float d = half_to_float(w.dm[F == Q5_K ? 2 * sb : sb]);
      const uint8_t* sc = w.sc + (first + 8 * g) * halves(F);
      for (int64_t j = 0; j < per; ++j) s[g * per + j] = d * (F == Q5_K ? static_cast<float>(sc[j]) : static_cast<int8_t>(sc[j]));
      if constexpr (F == Q5_K) {
        const float dmin = -half_to_float(w.dm[2 * sb + 1]);
        for (int64_t j = 0; j < 8; ++j) mw[8 * g + j] = dmin * w.mn[first + 8 * g + j];
      }
    }
  } else {
    halves_to_floats(w.d + first, s, nb);
    if constexpr (F == Q5_1) halves_to_floats(w.m + first, mw, nb);
  }
}

inline uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline uint64_t load_u64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

#if defined(__AVX2__)
// q6_k's high bits of one block (8 bytes, see the layout above) at bits 4..5 of byte e = element e,
// the rest zero: one broadcast, two variable 64-bit shifts (lane k: left by 4 - 2k, so lanes 0..2
// shift left and lane 3 right by 2) and a mask.
inline __m256i q6_high_bits(const uint8_t* planes) {
  const __m256i v = _mm256_set1_epi64x(static_cast<long long>(load_u64(planes)));
  const __m256i up = _mm256_sllv_epi64(v, _mm256_setr_epi64x(4, 2, 0, 0));
  return _mm256_and_si256(_mm256_srlv_epi64(up, _mm256_setr_epi64x(0, 0, 0, 2)), _mm256_set1_epi8(0x30));
}
#endif

// Code j of block b (the plain reference of every V::codes).
inline int wide_code(int64_t fmt, const uint8_t* row, const uint8_t* qh, int64_t b, int64_t j) {
  const uint8_t byte = row[b * 16 + j % 16];
  int q = j < 16 ? byte & 0x0F : byte >> 4;
  if (is_iq4(fmt)) return kIq4Levels[q];
  const uint8_t* planes = qh + b * Weight::qh_bytes_of(fmt);
  if (fmt == Q6_K) q |= (planes[j % 8] >> (2 * (j / 8)) & 3) << 4;
  else q |= (load_u32(planes) >> j & 1) << 4;
  return q - wide_offset(fmt);
}

inline const uint8_t* wide_qh_row(const Weight& w, int64_t n) { return w.qh + n * w.nb * w.qh_bytes(); }

// Decoding streams qs and qh; prefetched as the other formats are (see kPrefetchAhead).
inline void wide_prefetch(const Weight& w, const uint8_t* row, const uint8_t* qh, int64_t b) {
  if (b % 4) return;
  __builtin_prefetch(row + b * 16 + kPrefetchAhead, 0, 2);
  if (w.qh_bytes() && b % 16 == 0) __builtin_prefetch(qh + b * w.qh_bytes() + kPrefetchAhead / 4, 0, 2);
}

// sum(mw[b] * sums[b]) in 8 independent partial sums (vectorizable; a serial chain cost q5_k
// as much per row as its blocks' products).
inline float wide_mins(const float* mw, const float* sums, int64_t nb) {
  float part[8] = {};
  int64_t b = 0;
  for (; b + 8 <= nb; b += 8)
    for (int j = 0; j < 8; ++j) part[j] += mw[b + j] * sums[b + j];
  for (; b < nb; ++b) part[b % 8] += mw[b] * sums[b];
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

template <class V, int64_t F>
void wide_matmul_int8(const Weight& w, const QuantizedRows& xr, float* y, int64_t n_begin, int64_t n_end) {
  const int64_t nb = w.nb, M = xr.M;
  constexpr int64_t H = halves(F);
  std::vector<float> s(H * nb), mw(nb), sd(H * nb);
  std::vector<typename V::Acc> acc(M), acc_odd(M);
  for (int64_t n = n_begin; n < n_end; ++n) {
    wide_scales<F>(w, n, s.data(), mw.data());
    const uint8_t* row = w.qs + n * w.row_bytes();
    const uint8_t* qh = wide_qh_row(w, n);
    if (M == 1) {  // decoding: accumulators in registers
      const uint8_t* xq = xr.q.data();
      for (int64_t b = 0; b < nb; ++b)
        for (int64_t h = 0; h < H; ++h) sd[H * b + h] = s[H * b + h] * xr.dx[b];
      typename V::Acc a0{}, a1{};
      int64_t b = 0;
      for (; b + 2 <= nb; b += 2) {
        wide_prefetch(w, row, qh, b);
        a0 = V::template dot<F>(a0, V::template codes<F>(row, qh, b), xq + b * kBlock, sd.data() + H * b);
        a1 = V::template dot<F>(a1, V::template codes<F>(row, qh, b + 1), xq + (b + 1) * kBlock, sd.data() + H * b + H);
      }
      if (b < nb) a0 = V::template dot<F>(a0, V::template codes<F>(row, qh, b), xq + b * kBlock, sd.data() + H * b);
      acc[0] = a0;
      acc_odd[0] = a1;
    } else {
      for (int64_t m = 0; m < M; ++m) acc[m] = acc_odd[m] = typename V::Acc{};
      for (int64_t b = 0; b < nb; ++b) {
        const auto c = V::template codes<F>(row, qh, b);
        auto& into = (b & 1) ? acc_odd : acc;
        for (int64_t m = 0; m < M; ++m) {
          const float dx = xr.dx[m * xr.nbp + b];
          float sdm[H];
          for (int64_t h = 0; h < H; ++h) sdm[h] = s[H * b + h] * dx;
          into[m] = V::template dot<F>(into[m], c, xr.q.data() + m * xr.row_q + b * kBlock, sdm);
        }
      }
    }
    for (int64_t m = 0; m < M; ++m)
      y[m * w.N + n] = V::sum(acc[m], acc_odd[m]) + (has_min(F) ? wide_mins(mw.data(), xr.xs.data() + m * xr.nbp, nb) : 0.f);
  }
}

template <class V, int64_t F>
void wide_matmul_float(const Weight& w, const FloatRows& xr, float* y, int64_t n_begin, int64_t n_end) {
  const int64_t nb = w.nb, M = xr.M;
  constexpr int64_t H = halves(F);
  std::vector<float> s(H * nb), mw(nb);
  std::vector<typename V::FAcc> acc(M), acc_odd(M);
  for (int64_t n = n_begin; n < n_end; ++n) {
    wide_scales<F>(w, n, s.data(), mw.data());
    const uint8_t* row = w.qs + n * w.row_bytes();
    const uint8_t* qh = wide_qh_row(w, n);
    for (int64_t m = 0; m < M; ++m) acc[m] = acc_odd[m] = typename V::FAcc{};
    for (int64_t b = 0; b < nb; ++b) {
      wide_prefetch(w, row, qh, b);
      const auto c = V::template codes<F>(row, qh, b);
      auto& into = (b & 1) ? acc_odd : acc;
      for (int64_t m = 0; m < M; ++m) into[m] = V::fdot(into[m], c, xr.x + m * xr.K + b * kBlock, s[H * b], s[H * b + H - 1]);
    }
    for (int64_t m = 0; m < M; ++m)
      y[m * w.N + n] = V::sum(acc[m], acc_odd[m]) + (has_min(F) ? wide_mins(mw.data(), xr.sums.data() + m * xr.nbp, nb) : 0.f);
  }
}

template <class V, int64_t F, typename T>
void wide_dequantize(const Weight& w, T* out, int64_t n_begin, int64_t n_end) {
  constexpr int64_t H = halves(F);
  std::vector<float> s(H * w.nb), mw(w.nb);
  for (int64_t n = n_begin; n < n_end; ++n) {
    wide_scales<F>(w, n, s.data(), mw.data());
    const uint8_t* row = w.qs + n * w.row_bytes();
    const uint8_t* qh = wide_qh_row(w, n);
    for (int64_t b = 0; b < w.nb; ++b)
      V::store(out + n * w.K + b * kBlock, V::template codes<F>(row, qh, b), s[H * b], s[H * b + H - 1], mw[b]);
  }
}

template <template <class, int64_t> class Op, class V, class... Args>
void with_wide_format(int64_t fmt, Args&&... args) {
  switch (fmt) {
    case Q5_0: return Op<V, Q5_0>::run(args...);
    case Q5_1: return Op<V, Q5_1>::run(args...);
    case Q5_K: return Op<V, Q5_K>::run(args...);
    case Q6_K: return Op<V, Q6_K>::run(args...);
    case IQ4_NL: return Op<V, IQ4_NL>::run(args...);
    default: return Op<V, IQ4_XS>::run(args...);
  }
}
template <class V, int64_t F> struct WideInt8 {
  static void run(const Weight& w, const QuantizedRows& xr, float* y, int64_t a, int64_t b) { wide_matmul_int8<V, F>(w, xr, y, a, b); }
};
template <class V, int64_t F> struct WideFloat {
  static void run(const Weight& w, const FloatRows& xr, float* y, int64_t a, int64_t b) { wide_matmul_float<V, F>(w, xr, y, a, b); }
};
template <class V, int64_t F> struct WideDequantize {
  template <typename T> static void run(const Weight& w, T* out, int64_t a, int64_t b) { wide_dequantize<V, F>(w, out, a, b); }
};
template <class, int64_t F> struct WideScales {  // for tests: wide_scales with the format at run time
  static void run(const Weight& w, int64_t n, float* s, float* mw) { wide_scales<F>(w, n, s, mw); }
};

// --- Plain C++: the reference, and the kernels of builds without SIMD -----------------------------

namespace ref {

struct WideBlock {
  // int, not int8_t: GCC 12 vectorizes the int8 x int8 sums below with AVX-VNNI's unsigned-times-
  // signed vpdpbusd and gets them wrong (-O2 -mavxvnni or AVX-512 VNNI; seen with 12.2).
  struct C { int q[32]; };
  using Acc = float;
  using FAcc = float;
  template <int64_t F> static C codes(const uint8_t* row, const uint8_t* qh, int64_t b) {
    C c;
    for (int64_t j = 0; j < kBlock; ++j) c.q[j] = wide_code(F, row, qh, b, j);
    return c;
  }
  template <int64_t F> static float dot(float acc, const C& c, const uint8_t* xq, const float* sd) {
    int32_t lo = 0, hi = 0;
    for (int j = 0; j < 16; ++j) lo += c.q[j] * static_cast<int8_t>(xq[j]);
    for (int j = 16; j < 32; ++j) hi += c.q[j] * static_cast<int8_t>(xq[j]);
    return acc + (static_cast<float>(lo) * sd[0] + static_cast<float>(hi) * sd[halves(F) - 1]);
  }
  static float fdot(float acc, const C& c, const float* x, float s_lo, float s_hi) {
    float lo = 0.f, hi = 0.f;
    for (int j = 0; j < 16; ++j) lo += c.q[j] * x[j];
    for (int j = 16; j < 32; ++j) hi += c.q[j] * x[j];
    return acc + (lo * s_lo + hi * s_hi);
  }
  template <typename T> static void store(T* out, const C& c, float s_lo, float s_hi, float mn) {
    for (int j = 0; j < 32; ++j) out[j] = from_float<T>(static_cast<float>(c.q[j]) * (j < 16 ? s_lo : s_hi) + mn);
  }
  static float sum(float a, float b) { return a + b; }
};

inline void row_scales(const Weight& w, int64_t n, float* sw, float* mw) {
  for (int64_t b = 0; b < w.nb; ++b) {
    const int64_t i = n * w.nb + b;
    if (w.fmt == Q4_K) {
      const uint16_t* dm = w.dm + i / 8 * 2;
      sw[b] = half_to_float(dm[0]) * w.sc[i];
      mw[b] = -half_to_float(dm[1]) * w.mn[i];
    } else {
      sw[b] = half_to_float(w.d[i]);
      mw[b] = w.fmt == Q4_0 ? -8.f * sw[b] : w.fmt == Q4_1 ? half_to_float(w.m[i]) : 0.f;
    }
  }
}

inline int weight_code(const Weight& w, const uint8_t* row, int64_t b, int64_t j) {
  if (!w.q4()) return static_cast<int8_t>(row[b * kBlock + j]);
  const uint8_t byte = row[b * 16 + j % 16];
  return j < 16 ? byte & 0x0F : byte >> 4;
}

inline QuantizedRows quantize_rows(const float* x, int64_t M, int64_t K, Format) {
  const int64_t nb = K / kBlock;
  QuantizedRows r{M, nb, nb, K, std::vector<uint8_t>(M * K), std::vector<float>(M * nb), std::vector<float>(M * nb)};
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + m * K + b * kBlock;
      float amax = 0.f;
      for (int64_t j = 0; j < kBlock; ++j) amax = std::max(amax, std::fabs(xb[j]));
      const float d = amax / 127.f;
      const float id = d != 0.f ? 1.f / d : 0.f;
      int32_t sum = 0;
      for (int64_t j = 0; j < kBlock; ++j) {
        const int code = static_cast<int>(std::nearbyint(xb[j] * id));  // default rounding: half to even
        r.q[m * K + b * kBlock + j] = static_cast<uint8_t>(static_cast<int8_t>(code));
        sum += code;
      }
      const float dr = half_to_float(float_to_half(d));
      r.dx[m * nb + b] = dr;
      r.xs[m * nb + b] = dr * static_cast<float>(sum);
    }
  return r;
}

inline int activation_code(const QuantizedRows& r, Format, int64_t m, int64_t k) {
  return static_cast<int8_t>(r.q[m * r.row_q + k]);
}

inline void matmul_int8_rows(const Weight& w, const QuantizedRows& xr, float* y, int64_t n_begin, int64_t n_end) {
  if (w.wide()) return with_wide_format<WideInt8, WideBlock>(w.fmt, w, xr, y, n_begin, n_end);
  std::vector<float> sw(w.nb), mw(w.nb);
  for (int64_t n = n_begin; n < n_end; ++n) {
    row_scales(w, n, sw.data(), mw.data());
    const uint8_t* row = w.qs + n * w.row_bytes();
    for (int64_t m = 0; m < xr.M; ++m) {
      const uint8_t* xq = xr.q.data() + m * xr.row_q;
      float acc = 0.f, mins = 0.f;
      for (int64_t b = 0; b < w.nb; ++b) {
        int32_t dot = 0;
        for (int64_t j = 0; j < kBlock; ++j) dot += weight_code(w, row, b, j) * static_cast<int8_t>(xq[b * kBlock + j]);
        acc += static_cast<float>(dot) * (sw[b] * xr.dx[m * xr.nbp + b]);
        mins += mw[b] * xr.xs[m * xr.nbp + b];
      }
      y[m * w.N + n] = acc + mins;
    }
  }
}

inline FloatRows prepare_float_rows(const float* x, int64_t M, int64_t K) {
  const int64_t nb = K / kBlock;
  FloatRows r{x, M, K, nb, std::vector<float>(M * nb)};
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < nb; ++b) {
      float s = 0.f;
      for (int64_t j = 0; j < kBlock; ++j) s += x[m * K + b * kBlock + j];
      r.sums[m * nb + b] = s;
    }
  return r;
}

inline void matmul_float_rows(const Weight& w, const FloatRows& xr, float* y, int64_t n_begin, int64_t n_end) {
  if (w.wide()) return with_wide_format<WideFloat, WideBlock>(w.fmt, w, xr, y, n_begin, n_end);
  std::vector<float> sw(w.nb), mw(w.nb);
  for (int64_t n = n_begin; n < n_end; ++n) {
    row_scales(w, n, sw.data(), mw.data());
    const uint8_t* row = w.qs + n * w.row_bytes();
    for (int64_t m = 0; m < xr.M; ++m) {
      const float* x = xr.x + m * xr.K;
      float acc = 0.f, mins = 0.f;
      for (int64_t b = 0; b < w.nb; ++b) {
        float dot = 0.f;
        for (int64_t j = 0; j < kBlock; ++j) dot += weight_code(w, row, b, j) * x[b * kBlock + j];
        acc += sw[b] * dot;
        mins += mw[b] * xr.sums[m * xr.nbp + b];
      }
      y[m * w.N + n] = acc + mins;
    }
  }
}

// Rows [n_begin, n_end) of the dense [N, K] weight, float32 or bfloat16.
template <typename T>
void dequantize_rows(const Weight& w, T* out, int64_t n_begin, int64_t n_end) {
  if (w.wide()) return with_wide_format<WideDequantize, WideBlock>(w.fmt, w, out, n_begin, n_end);
  std::vector<float> sw(w.nb), mw(w.nb);
  for (int64_t n = n_begin; n < n_end; ++n) {
    row_scales(w, n, sw.data(), mw.data());
    const uint8_t* row = w.qs + n * w.row_bytes();
    for (int64_t b = 0; b < w.nb; ++b)
      for (int64_t j = 0; j < kBlock; ++j)
        out[n * w.K + b * kBlock + j] = from_float<T>(weight_code(w, row, b, j) * sw[b] + mw[b]);
  }
}

// One head of one query against its cache stretch: kb, vb point at slot 0 of the head's keys and
// values (C: the activations' type T, or half for a 16-bit cache under float32 activations);
// `allowed` is the row's [S] mask or null. p is scratch of S floats.
template <typename T, typename C>
void attend_head(const T* q, const C* kb, const C* vb, const bool* allowed, T* out, int64_t S, int64_t hd,
                 float scale, float* p) {
  float mx = -INFINITY;
  for (int64_t s = 0; s < S; ++s) {
    if (allowed && !allowed[s]) { p[s] = -INFINITY; continue; }
    float dot = 0.f;
    for (int64_t d = 0; d < hd; ++d) dot += to_float(q[d]) * scale * to_float(kb[s * hd + d]);
    p[s] = dot;
    mx = std::max(mx, dot);
  }
  float total = 0.f;
  for (int64_t s = 0; s < S; ++s) { p[s] = std::exp(p[s] - mx); total += p[s]; }
  for (int64_t d = 0; d < hd; ++d) {
    float acc = 0.f;
    for (int64_t s = 0; s < S; ++s)
      if (p[s] != 0.f) acc += p[s] * to_float(vb[s * hd + d]);
    out[d] = from_float<T>(acc * (1.f / total));
  }
}

// Decoding: the same kernel (this build has one int8 kernel for any number of rows).
inline void matmul_int8_decode(const Weight& w, const QuantizedRows& xr, float* y, int64_t n_begin, int64_t n_end) {
  matmul_int8_rows(w, xr, y, n_begin, n_end);
}

}  // namespace ref

// --- AVX-512 VNNI -------------------------------------------------------------------------------

#if defined(PHI3_AVX512)
namespace avx512 {

inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

// Block b of a row widened to float: elements 0..15 in lo, 16..31 in hi (codes, before scale).
inline void widen_block(bool q4, const uint8_t* row, int64_t b, __m512& lo, __m512& hi) {
  if (q4) {
    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * 16)));
    lo = _mm512_cvtepi32_ps(_mm512_and_si512(q, _mm512_set1_epi32(0x0F)));
    hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4));
  } else {
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * kBlock));
    lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q)));
    hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1)));
  }
}

inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1); }

// Float scale and min of each block of row n into sw, mw (round_up(nb, 16) entries, zero-padded).
inline void row_scales(const Weight& w, int64_t n, float* sw, float* mw) {
  const int64_t nb = w.nb;
  for (int64_t j = 0; j < nb; j += 16) {
    const __mmask16 k = tail_mask(nb - j);
    __m512 s, mn;
    if (w.fmt == Q4_K) {
      // Blocks j..j+15 span super-blocks j/8 and j/8+1 (or only the first at a tail of 8).
      const uint16_t* dm = w.dm + (n * nb + j) / 8 * 2;
      __m512 dd = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(nb - j >= 16 ? 0xF : 0x3, dm));
      const __m512 dv = _mm512_permutexvar_ps(_mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0), dd);
      const __m512 dminv = _mm512_permutexvar_ps(_mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1), dd);
      s = _mm512_mul_ps(dv, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, w.sc + n * nb + j))));
      mn = _mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), dminv),
                         _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, w.mn + n * nb + j))));
    } else {
      s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, w.d + n * nb + j));
      if (w.fmt == Q4_0) mn = _mm512_mul_ps(s, _mm512_set1_ps(-8.f));
      else if (w.fmt == Q4_1) mn = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, w.m + n * nb + j));
      else mn = _mm512_setzero_ps();
    }
    _mm512_storeu_ps(sw + j, _mm512_maskz_mov_ps(k, s));
    _mm512_storeu_ps(mw + j, _mm512_maskz_mov_ps(k, mn));
  }
}

// Codes per row: round_up(nb, 4) * 32 bytes in the weight format's order. q4: groups of 4
// blocks = 128 bytes, elements 0..15 of the 4 blocks, then elements 16..31. q8_0: natural
// order, offset by 128 to unsigned for vpdpbusd's unsigned operand (corrected with the weight sums).
// The wide formats: natural order, signed (their dot product takes the sign trick instead).
inline QuantizedRows quantize_rows(const float* x, int64_t M, int64_t K, Format fmt) {
  const bool q4_order = fmt < Q8_0, offset = fmt == Q8_0;
  QuantizedRows r;
  r.M = M; r.nb = K / kBlock; r.nbp = round_up(r.nb, 16);
  r.row_q = round_up(r.nb, 4) * kBlock;
  r.q.assign(M * r.row_q, offset ? 0x80 : 0);
  r.dx.assign(M * r.nbp, 0.f);
  r.xs.assign(M * r.nbp, 0.f);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < r.nb; ++b) {
      const float* xb = x + m * K + b * kBlock;
      const __m512 lo = _mm512_loadu_ps(xb), hi = _mm512_loadu_ps(xb + 16);
      const float amax = std::max(_mm512_reduce_max_ps(_mm512_abs_ps(lo)), _mm512_reduce_max_ps(_mm512_abs_ps(hi)));
      const float d = amax / 127.f;
      const float id = d != 0.f ? 1.f / d : 0.f;
      const __m512i qlo = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(lo, _mm512_set1_ps(id)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      const __m512i qhi = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(hi, _mm512_set1_ps(id)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      const float dr = _cvtsh_ss(_cvtss_sh(d, 0));
      r.dx[m * r.nbp + b] = dr;
      r.xs[m * r.nbp + b] = dr * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi)));
      uint8_t* out = r.q.data() + m * r.row_q;
      if (q4_order) {
        const int64_t g = b / 4, i = b % 4;
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + g * 128 + i * 16), _mm512_cvtepi32_epi8(qlo));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + g * 128 + 64 + i * 16), _mm512_cvtepi32_epi8(qhi));
      } else {
        const __m512i off = _mm512_set1_epi32(offset ? 128 : 0);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + b * 32), _mm512_cvtepi32_epi8(_mm512_add_epi32(qlo, off)));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + b * 32 + 16), _mm512_cvtepi32_epi8(_mm512_add_epi32(qhi, off)));
      }
    }
  }
  return r;
}

inline int activation_code(const QuantizedRows& r, Format fmt, int64_t m, int64_t k) {
  const int64_t b = k / kBlock, j = k % kBlock;
  const uint8_t* row = r.q.data() + m * r.row_q;
  if (fmt == Q8_0) return row[k] - 128;
  if (fmt > Q8_0) return static_cast<int8_t>(row[k]);
  return static_cast<int8_t>(row[b / 4 * 128 + (j / 16) * 64 + b % 4 * 16 + j % 16]);
}

// float32 -> bfloat16, round to nearest even (finite values), without requiring AVX512-BF16.
inline __m256i to_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

inline __m512 expand4(const float* p) {  // 4 floats -> each repeated 4 times
  return _mm512_permutexvar_ps(_mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0),
                               _mm512_castps128_ps512(_mm_loadu_ps(p)));
}
inline __m512 expand2x8(const float* p) {  // 2 floats -> each repeated 8 times
  return _mm512_permutexvar_ps(_mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
                               _mm512_castps128_ps512(_mm_castsi128_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))));
}

inline void store_block(float* o, __m512 lo, __m512 hi) {
  _mm512_storeu_ps(o, lo);
  _mm512_storeu_ps(o + 16, hi);
}
inline void store_block(bf16* o, __m512 lo, __m512 hi) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), to_bf16(lo));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 16), to_bf16(hi));
}

// sd[0] in lanes 0..3, sd[1] in lanes 4..7; one broadcast where both halves share a scale.
template <int64_t F> __m256 half_scales(const float* sd) {
  if constexpr (F != Q6_K) return _mm256_broadcast_ss(sd);
  const __m128 pair = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(sd)));
  return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(pair), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
}

// The wide formats' block primitives (see wide_matmul_int8): one block in a 256-bit register.
struct WideBlock {
  using C = __m256i;
  using Acc = __m256;
  using FAcc = __m512;
  template <int64_t F> static __m256i codes(const uint8_t* row, const uint8_t* qh, int64_t b) {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * 16));
    const __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), _mm256_set1_epi8(0x0F));
    if constexpr (is_iq4(F)) {
      return _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(kIq4Levels))), q);
    } else {
      // q5: the plane's 32 bits are a byte mask, the high bits need no shuffling.
      const uint8_t* planes = qh + b * Weight::qh_bytes_of(F);
      const __m256i c = F == Q6_K ? _mm256_or_si256(q, q6_high_bits(planes))
                                  : _mm256_mask_add_epi8(q, load_u32(planes), q, _mm256_set1_epi8(16));
      return wide_offset(F) ? _mm256_sub_epi8(c, _mm256_set1_epi8(wide_offset(F))) : c;
    }
  }
  template <int64_t F> static __m256 dot(__m256 acc, __m256i c, const uint8_t* xq, const float* sd) {
    // |w| times x with w's sign (|w| <= 127): int32 lanes 0..3 hold codes 0..15, lanes 4..7 the rest.
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
    const __m256i i = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_abs_epi8(c), _mm256_sign_epi8(x, c));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), half_scales<F>(sd), acc);
  }
  static void widen(__m256i c, __m512& lo, __m512& hi) {
    lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(c)));
    hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(c, 1)));
  }
  static __m512 fdot(__m512 acc, __m256i c, const float* x, float s_lo, float s_hi) {
    __m512 lo, hi;
    widen(c, lo, hi);
    acc = _mm512_fmadd_ps(_mm512_mul_ps(lo, _mm512_loadu_ps(x)), _mm512_set1_ps(s_lo), acc);
    return _mm512_fmadd_ps(_mm512_mul_ps(hi, _mm512_loadu_ps(x + 16)), _mm512_set1_ps(s_hi), acc);
  }
  template <typename T> static void store(T* out, __m256i c, float s_lo, float s_hi, float mn) {
    __m512 lo, hi;
    widen(c, lo, hi);
    store_block(out, _mm512_fmadd_ps(lo, _mm512_set1_ps(s_lo), _mm512_set1_ps(mn)),
                _mm512_fmadd_ps(hi, _mm512_set1_ps(s_hi), _mm512_set1_ps(mn)));
  }
  static float sum(__m256 a, __m256 b) { return hsum(_mm512_insertf32x8(_mm512_setzero_ps(), _mm256_add_ps(a, b), 0)); }
  static float sum(__m512 a, __m512 b) { return hsum(_mm512_add_ps(a, b)); }
};

// q6_k blocks 2u and 2u + 1 as unsigned codes 0..63 in natural order (the activations' order):
// 64 codes in one register from 32 bytes of nibbles and 16 of high bits, 7 operations. The high
// bits of element 8k + i are bits 2k, 2k+1 of byte i of its block's 8 (see the layout at the top):
// with the 8-byte groups in lanes [A A A A B B B B], shifts left by 4, 2, 0, 0 and right by
// 0, 0, 0, 2 put them at bits 4..5.
inline __m512i q6_k_pair_codes(const uint8_t* row, const uint8_t* qh, int64_t u) {
  const __m512i packed = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + u * 32)));
  const __m512i nibbles = _mm512_and_si512(
      _mm512_srlv_epi64(_mm512_shuffle_i64x2(packed, packed, 0x50), _mm512_setr_epi64(0, 0, 4, 4, 0, 0, 4, 4)),
      _mm512_set1_epi8(0x0F));  // [block 2u's bytes, >> 4, block 2u + 1's, >> 4]
  const __m512i groups = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 0, 0, 0, 1, 1, 1, 1),
                                                  _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qh + u * 16))));
  const __m512i high = _mm512_srlv_epi64(_mm512_sllv_epi64(groups, _mm512_setr_epi64(4, 2, 0, 0, 4, 2, 0, 0)),
                                         _mm512_setr_epi64(0, 0, 0, 2, 0, 0, 0, 2));
  return _mm512_ternarylogic_epi64(nibbles, high, _mm512_set1_epi8(0x30), 0xF8);  // nibbles | (high & 0x30)
}

// q6_k, every number of rows: two blocks per 512-bit step. The generic wide path, one block per
// 256-bit register with a sign flip per block, decoded q6_k 9216x3072 in 4.30 ms against 2.85 for
// this (one thread, CPU time, A/B in one process, loaded Xeon, 2026-12-02; q4_k 2.17: 1.31x). Raw codes times x
// with -32 * x's 4-code sums as the starting value; int32 lanes 0..3 are block 2u's codes 0..15,
// 4..7 its 16..31, 8..15 block 2u + 1's, so sd = s * dx in its natural order times 4 is the scale
// vector. Units alternate two accumulators per row, the same for any number of rows.
inline void q6_k_matmul_int8(const Weight& w, const QuantizedRows& xr, float* y, int64_t n_begin, int64_t n_end) {
  const int64_t nb = w.nb, M = xr.M, units = nb / 2;  // nb is a multiple of 8
  std::vector<float> s(2 * nb), mw(nb), sd(2 * nb * M);
  std::vector<__m512> acc(M), acc_odd(M);
  const __m512i offset = _mm512_set1_epi8(32);
  for (int64_t n = n_begin; n < n_end; ++n) {
    wide_scales<Q6_K>(w, n, s.data(), mw.data());
    const uint8_t* row = w.qs + n * w.row_bytes();
    const uint8_t* qh = wide_qh_row(w, n);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t b = 0; b < nb; ++b) {
        const float dx = xr.dx[m * xr.nbp + b];
        sd[m * 2 * nb + 2 * b] = s[2 * b] * dx;
        sd[m * 2 * nb + 2 * b + 1] = s[2 * b + 1] * dx;
      }
    if (M == 1) {  // decoding: accumulators in registers
      const uint8_t* xq = xr.q.data();
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
      for (int64_t u = 0; u + 2 <= units; u += 2) {
        _mm_prefetch(reinterpret_cast<const char*>(row + u * 32 + kPrefetchAhead), _MM_HINT_T1);
        if (u % 4 == 0) _mm_prefetch(reinterpret_cast<const char*>(qh + u * 16 + kPrefetchAhead / 2), _MM_HINT_T1);
        for (int i = 0; i < 2; ++i) {
          const __m512i x = _mm512_loadu_si512(xq + (u + i) * 64);
          const __m512i z = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), offset, x));
          const __m512 p = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(z, q6_k_pair_codes(row, qh, u + i), x));
          if (i == 0) a0 = _mm512_fmadd_ps(p, expand4(sd.data() + 4 * u), a0);
          else a1 = _mm512_fmadd_ps(p, expand4(sd.data() + 4 * (u + 1)), a1);
        }
      }
      if (units % 2) {
        const int64_t u = units - 1;
        const __m512i x = _mm512_loadu_si512(xq + u * 64);
        const __m512i z = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), offset, x));
        a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(z, q6_k_pair_codes(row, qh, u), x)), expand4(sd.data() + 4 * u), a0);
      }
      y[n] = hsum(_mm512_add_ps(a0, a1));
      continue;
    }
    for (int64_t m = 0; m < M; ++m) acc[m] = acc_odd[m] = _mm512_setzero_ps();
    for (int64_t u = 0; u < units; ++u) {
      const __m512i c = q6_k_pair_codes(row, qh, u);
      std::vector<__m512>& into = (u & 1) ? acc_odd : acc;
      for (int64_t m = 0; m < M; ++m) {
        const __m512i x = _mm512_loadu_si512(xr.q.data() + m * xr.row_q + u * 64);
        const __m512i z = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), offset, x));
        into[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(z, c, x)), expand4(sd.data() + m * 2 * nb + 4 * u), into[m]);
      }
    }
    for (int64_t m = 0; m < M; ++m) y[m * w.N + n] = hsum(_mm512_add_ps(acc[m], acc_odd[m]));
  }
}

inline void matmul_int8_rows(const Weight& w, const QuantizedRows& xr, float* y, int64_t n_begin, int64_t n_end) {
  if (w.fmt == Q6_K) return q6_k_matmul_int8(w, xr, y, n_begin, n_end);
  if (w.wide()) return with_wide_format<WideInt8, WideBlock>(w.fmt, w, xr, y, n_begin, n_end);
  const int64_t nb = w.nb, N = w.N, M = xr.M, nbp = xr.nbp, row_q = xr.row_q;
  const __m512i low = _mm512_set1_epi8(0x0F);
  const __m512i ones = _mm512_set1_epi8(1);
  std::vector<float> sw(nbp + 4), mw(nbp + 4);
  std::vector<__m512> acc(M), acc_odd(M);
  for (int64_t n = n_begin; n < n_end; ++n) {
    row_scales(w, n, sw.data(), mw.data());
    const uint8_t* row = w.qs + n * w.row_bytes();
    for (int64_t m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    if (w.q4() && M == 1) {
      // Decoding: accumulators in registers, two groups per step for independent chains.
      const uint8_t* xq = xr.q.data();
      const float* dx = xr.dx.data();
      __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
      int64_t g = 0;
      for (; (g + 2) * 4 <= nb; g += 2) {
        _mm_prefetch(reinterpret_cast<const char*>(row + g * 64 + kPrefetchAhead), _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(row + g * 64 + 64 + kPrefetchAhead), _MM_HINT_T1);
        const __m512i q0 = _mm512_loadu_si512(row + g * 64), q1 = _mm512_loadu_si512(row + g * 64 + 64);
        __m512i i0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(q0, low), _mm512_loadu_si512(xq + g * 128));
        __m512i i1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(q1, low), _mm512_loadu_si512(xq + g * 128 + 128));
        i0 = _mm512_dpbusd_epi32(i0, _mm512_and_si512(_mm512_srli_epi16(q0, 4), low), _mm512_loadu_si512(xq + g * 128 + 64));
        i1 = _mm512_dpbusd_epi32(i1, _mm512_and_si512(_mm512_srli_epi16(q1, 4), low), _mm512_loadu_si512(xq + g * 128 + 192));
        // 8 block scales at once: (sw * dx) for blocks 4g..4g+7, each repeated 4 times per group
        const __m256 sd = _mm256_mul_ps(_mm256_loadu_ps(sw.data() + g * 4), _mm256_loadu_ps(dx + g * 4));
        const __m512 sd8 = _mm512_castps256_ps512(sd);
        const __m512 s0 = _mm512_permutexvar_ps(_mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0), sd8);
        const __m512 s1 = _mm512_permutexvar_ps(_mm512_set_epi32(7, 7, 7, 7, 6, 6, 6, 6, 5, 5, 5, 5, 4, 4, 4, 4), sd8);
        acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i0), s0, acc0);
        acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i1), s1, acc1);
      }
      for (; g * 4 < nb; ++g) {
        const int64_t left = nb - g * 4;
        const __m512i q = left >= 4 ? _mm512_loadu_si512(row + g * 64)
                                    : _mm512_maskz_loadu_epi8((1ull << (left * 16)) - 1, row + g * 64);
        __m512i isum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(q, low), _mm512_loadu_si512(xq + g * 128));
        isum = _mm512_dpbusd_epi32(isum, _mm512_and_si512(_mm512_srli_epi16(q, 4), low), _mm512_loadu_si512(xq + g * 128 + 64));
        const __m512 sdx = _mm512_mul_ps(expand4(sw.data() + g * 4), expand4(dx + g * 4));
        acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), sdx, acc0);
      }
      acc[0] = _mm512_add_ps(acc0, acc1);
    } else if (w.q4()) {
      // The one-row path's summation order (odd groups of the paired stretch in a second
      // accumulator), so that a row's result never depends on how many rows share the call.
      const int64_t paired = nb / 8 * 2;
      for (int64_t m = 0; m < M; ++m) acc_odd[m] = _mm512_setzero_ps();
      for (int64_t g = 0; g * 4 < nb; ++g) {
        const int64_t left = nb - g * 4;
        const __m512i q = left >= 4 ? _mm512_loadu_si512(row + g * 64)
                                    : _mm512_maskz_loadu_epi8((1ull << (left * 16)) - 1, row + g * 64);
        const __m512i lo = _mm512_and_si512(q, low);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(q, 4), low);
        const __m512 s = expand4(sw.data() + g * 4);
        std::vector<__m512>& into = (g < paired && (g & 1)) ? acc_odd : acc;
        for (int64_t m = 0; m < M; ++m) {
          const uint8_t* xq = xr.q.data() + m * row_q + g * 128;
          __m512i isum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xq));
          isum = _mm512_dpbusd_epi32(isum, hi, _mm512_loadu_si512(xq + 64));
          const __m512 sdx = _mm512_mul_ps(s, expand4(xr.dx.data() + m * nbp + g * 4));
          into[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), sdx, into[m]);
        }
      }
      for (int64_t m = 0; m < M; ++m) acc[m] = _mm512_add_ps(acc[m], acc_odd[m]);
    } else {
      for (int64_t g = 0; g * 2 < nb; ++g) {
        const int64_t left = nb - g * 2;
        const __m512i q = left >= 2 ? _mm512_loadu_si512(row + g * 64)
                                    : _mm512_maskz_loadu_epi8(0xFFFFFFFFull, row + g * 64);
        // sum((x + 128) * w) - 128 * sum(w) = sum(x * w)
        const __m512i wsum = _mm512_slli_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, q), 7);
        const __m512 s = expand2x8(sw.data() + g * 2);
        for (int64_t m = 0; m < M; ++m) {
          const uint8_t* xq = xr.q.data() + m * row_q + g * 64;
          const __m512i isum = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(xq), q), wsum);
          const __m512 sdx = _mm512_mul_ps(s, expand2x8(xr.dx.data() + m * nbp + g * 2));
          acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), sdx, acc[m]);
        }
      }
    }
    for (int64_t m = 0; m < M; ++m) {
      __m512 mins = _mm512_setzero_ps();
      if (w.fmt != Q8_0)
        for (int64_t j = 0; j < nbp; j += 16)
          mins = _mm512_fmadd_ps(_mm512_loadu_ps(mw.data() + j), _mm512_loadu_ps(xr.xs.data() + m * nbp + j), mins);
      y[m * N + n] = hsum(_mm512_add_ps(acc[m], mins));
    }
  }
}

inline FloatRows prepare_float_rows(const float* x, int64_t M, int64_t K) {
  const int64_t nb = K / kBlock, nbp = round_up(nb, 16);
  FloatRows r{x, M, K, nbp, std::vector<float>(M * nbp, 0.f)};
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + m * K + b * kBlock;
      r.sums[m * nbp + b] = hsum(_mm512_add_ps(_mm512_loadu_ps(xb), _mm512_loadu_ps(xb + 16)));
    }
  return r;
}

// Exact path: nibbles widened to float against float x.
inline void matmul_float_rows(const Weight& w, const FloatRows& xr, float* y, int64_t n_begin, int64_t n_end) {
  if (w.wide()) return with_wide_format<WideFloat, WideBlock>(w.fmt, w, xr, y, n_begin, n_end);
  const int64_t K = w.K, nb = w.nb, N = w.N, M = xr.M, nbp = xr.nbp;
  const float* x = xr.x;
  std::vector<float> sw(nbp), mw(nbp);
  std::vector<__m512> acc(M), acc_odd(M);
  for (int64_t n = n_begin; n < n_end; ++n) {
    row_scales(w, n, sw.data(), mw.data());
    const uint8_t* row = w.qs + n * w.row_bytes();
    for (int64_t m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    if (M == 1) {
      // Decoding: accumulators in registers, alternating between two for independent chains.
      __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
      for (int64_t b = 0; b < nb; ++b) {
        __m512 lo, hi;
        widen_block(w.q4(), row, b, lo, hi);
        __m512 dot = _mm512_mul_ps(lo, _mm512_loadu_ps(x + b * kBlock));
        dot = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + b * kBlock + 16), dot);
        if (b & 1) acc1 = _mm512_fmadd_ps(dot, _mm512_set1_ps(sw[b]), acc1);
        else acc0 = _mm512_fmadd_ps(dot, _mm512_set1_ps(sw[b]), acc0);
      }
      acc[0] = _mm512_add_ps(acc0, acc1);
    } else {
      // The one-row path's summation order (see matmul_int8_rows).
      for (int64_t m = 0; m < M; ++m) acc_odd[m] = _mm512_setzero_ps();
      for (int64_t b = 0; b < nb; ++b) {
        __m512 lo, hi;
        widen_block(w.q4(), row, b, lo, hi);
        const __m512 s = _mm512_set1_ps(sw[b]);
        std::vector<__m512>& into = (b & 1) ? acc_odd : acc;
        for (int64_t m = 0; m < M; ++m) {
          const float* xb = x + m * K + b * kBlock;
          __m512 dot = _mm512_mul_ps(lo, _mm512_loadu_ps(xb));
          dot = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb + 16), dot);
          into[m] = _mm512_fmadd_ps(dot, s, into[m]);
        }
      }
      for (int64_t m = 0; m < M; ++m) acc[m] = _mm512_add_ps(acc[m], acc_odd[m]);
    }
    for (int64_t m = 0; m < M; ++m) {
      __m512 mins = _mm512_setzero_ps();
      for (int64_t j = 0; j < nbp; j += 16)
        mins = _mm512_fmadd_ps(_mm512_loadu_ps(mw.data() + j), _mm512_loadu_ps(xr.sums.data() + m * nbp + j), mins);
      y[m * N + n] = hsum(_mm512_add_ps(acc[m], mins));
    }
  }
}

template <typename T>
void dequantize_rows(const Weight& w, T* out, int64_t n_begin, int64_t n_end) {
  if (w.wide()) return with_wide_format<WideDequantize, WideBlock>(w.fmt, w, out, n_begin, n_end);
  const int64_t K = w.K, nb = w.nb, nbp = round_up(nb, 16);
  std::vector<float> sw(nbp), mw(nbp);
  for (int64_t n = n_begin; n < n_end; ++n) {
    row_scales(w, n, sw.data(), mw.data());
    const uint8_t* row = w.qs + n * w.row_bytes();
    for (int64_t blk = 0; blk < nb; ++blk) {
      const __m512 s = _mm512_set1_ps(sw[blk]), mn = _mm512_set1_ps(mw[blk]);  // q8_0: min 0
      __m512 lo, hi;
      widen_block(w.q4(), row, blk, lo, hi);
      store_block(out + n * K + blk * kBlock, _mm512_fmadd_ps(lo, s, mn), _mm512_fmadd_ps(hi, s, mn));
    }
  }
}

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16* p) {  // bfloat16 is the top half of a float32
  __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
inline __m512 load16(const half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

template <typename T, typename C>
void attend_head(const T* q, const C* kb, const C* vb, const bool* allowed, T* out, int64_t S, int64_t hd,
                 float scale, float* p) {
  const int64_t chunks = hd / 16;
  __m512 qv[8], acc[8];
  for (int64_t c = 0; c < chunks; ++c) qv[c] = _mm512_mul_ps(load16(q + c * 16), _mm512_set1_ps(scale));
  float mx = -INFINITY;
  for (int64_t s = 0; s < S; ++s) {
    if (allowed && !allowed[s]) { p[s] = -INFINITY; continue; }
    const C* ks = kb + s * hd;
    __m512 dot = _mm512_mul_ps(qv[0], load16(ks));
    for (int64_t c = 1; c < chunks; ++c) dot = _mm512_fmadd_ps(qv[c], load16(ks + c * 16), dot);
    p[s] = _mm512_reduce_add_ps(dot);
    mx = std::max(mx, p[s]);
  }
  float total = 0.f;
  for (int64_t s = 0; s < S; ++s) { p[s] = std::exp(p[s] - mx); total += p[s]; }
  for (int64_t c = 0; c < chunks; ++c) acc[c] = _mm512_setzero_ps();
  for (int64_t s = 0; s < S; ++s) {
    if (p[s] == 0.f) continue;
    const __m512 ps = _mm512_set1_ps(p[s]);
    const C* vs = vb + s * hd;
    for (int64_t c = 0; c < chunks; ++c) acc[c] = _mm512_fmadd_ps(ps, load16(vs + c * 16), acc[c]);
  }
  alignas(64) float tmp[16];
  for (int64_t c = 0; c < chunks; ++c) {
    _mm512_store_ps(tmp, _mm512_mul_ps(acc[c], _mm512_set1_ps(1.f / total)));
    for (int64_t d = 0; d < 16; ++d) out[c * 16 + d] = from_float<T>(tmp[d]);
  }
}

// Decoding: the same kernel (this build has one int8 kernel for any number of rows).
inline void matmul_int8_decode(const Weight& w, const QuantizedRows& xr, float* y, int64_t n_begin, int64_t n_end) {
  matmul_int8_rows(w, xr, y, n_begin, n_end);
}

}  // namespace avx512
#endif  // PHI3_AVX512

// --- AVX2 + FMA + F16C (AVX-VNNI where enabled) -----------------------------------------------------
// Decoding q4_0 on our 2-core Zen 5 test machine (bench_gemv.py, A/B in one process, 2026-12-02):
// 34-38 GB/s on 2 threads where the AVX-512 build streams 29-32, and 20-24 GB/s on one thread
// against 16; without AVX-VNNI (vpmaddubsw + vpmaddwd) 5-10% below that. Every format but q8_0
// multiplies int8 activations four weight rows at a time, tiled against several activation rows
// (see "Four weight rows at a time" below): prompts reuse each unpacked weight block.

#if defined(PHI3_AVX2)
namespace avx2 {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

inline __m128i load128(const void* p) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); }
inline __m256i load256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

inline __m256 load_halves(const uint16_t* p, int64_t count) {  // count > 8: the first 8
  if (count >= 8) return _mm256_cvtph_ps(load128(p));
  uint16_t padded[8] = {};
  std::memcpy(padded, p, count * sizeof(uint16_t));
  return _mm256_cvtph_ps(load128(padded));
}
inline __m256 load_bytes_as_floats(const uint8_t* p) {  // 8 unsigned bytes
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(static_cast<const __m128i*>(static_cast<const void*>(p)))));
}

// Float scale and min of each block of row n into sw, mw (round_up(nb, 8) entries, zero-padded).
inline void row_scales(const Weight& w, int64_t n, float* sw, float* mw) {
  const int64_t nb = w.nb;
  for (int64_t j = 0; j < nb; j += 8) {
    __m256 s, mn;
    if (w.fmt == Q4_K) {  // nb is a multiple of 8: blocks j..j+7 are one super-block
      const uint16_t* dm = w.dm + (n * nb + j) / 8 * 2;
      s = _mm256_mul_ps(_mm256_set1_ps(half_to_float(dm[0])), load_bytes_as_floats(w.sc + n * nb + j));
      mn = _mm256_mul_ps(_mm256_set1_ps(-half_to_float(dm[1])), load_bytes_as_floats(w.mn + n * nb + j));
    } else {
      s = load_halves(w.d + n * nb + j, nb - j);
      if (w.fmt == Q4_0) mn = _mm256_mul_ps(s, _mm256_set1_ps(-8.f));
      else if (w.fmt == Q4_1) mn = load_halves(w.m + n * nb + j, nb - j);
      else mn = _mm256_setzero_ps();
    }
    _mm256_storeu_ps(sw + j, s);
    _mm256_storeu_ps(mw + j, mn);
  }
}

// One block of activations to 32 int8 codes in natural order, with its rounded scale and code sum.
inline __m256i quantize_block(const float* xb, float& d_rounded, int32_t& code_sum) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 v[4], amax = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(xb + 8 * i);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
  }
  const float d = hmax(amax) / 127.f;
  const float id = d != 0.f ? 1.f / d : 0.f;
  __m256i c[4];
  for (int i = 0; i < 4; ++i)
    c[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], _mm256_set1_ps(id)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  code_sum = hsum(_mm256_add_epi32(_mm256_add_epi32(c[0], c[1]), _mm256_add_epi32(c[2], c[3])));
  d_rounded = _cvtsh_ss(_cvtss_sh(d, 0));
  // The packs interleave 128-bit lanes: 4-byte groups come out as 0 2 4 6 1 3 5 7.
  const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
  return _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// Codes per row, round_up(nb, 2) * 32 bytes. q4 and q6_k: pairs of blocks, 64 bytes: elements
// 0..15 of blocks 2p and 2p+1, then their elements 16..31, to match one 32-byte load of both
// blocks' packed nibbles (low nibbles, then high). q8_0 and the other wide formats: natural order.
constexpr bool pair_order(int64_t fmt) { return fmt < Q8_0 || fmt == Q6_K; }

inline QuantizedRows quantize_rows(const float* x, int64_t M, int64_t K, Format fmt) {
  QuantizedRows r;
  r.M = M; r.nb = K / kBlock; r.nbp = round_up(r.nb, 8);
  r.row_q = round_up(r.nb, 2) * kBlock;
  r.q.assign(M * r.row_q, 0);
  r.dx.assign(M * r.nbp, 0.f);
  r.xs.assign(M * r.nbp, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < r.nb; ++b) {
      float dr;
      int32_t code_sum;
      const __m256i codes = quantize_block(x + m * K + b * kBlock, dr, code_sum);
      r.dx[m * r.nbp + b] = dr;
      r.xs[m * r.nbp + b] = dr * static_cast<float>(code_sum);
      uint8_t* out = r.q.data() + m * r.row_q;
      if (!pair_order(fmt)) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + b * kBlock), codes);
      } else {
        uint8_t* pair = out + b / 2 * 64 + b % 2 * 16;
        _mm_storeu_si128(reinterpret_cast<__m128i*>(pair), _mm256_castsi256_si128(codes));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(pair + 32), _mm256_extracti128_si256(codes, 1));
      }
    }
  return r;
}

inline int activation_code(const QuantizedRows& r, Format fmt, int64_t m, int64_t k) {
  const int64_t b = k / kBlock, j = k % kBlock;
  const uint8_t* row = r.q.data() + m * r.row_q;
  if (!pair_order(fmt)) return static_cast<int8_t>(row[k]);
  return static_cast<int8_t>(row[b / 2 * 64 + (j / 16) * 32 + b % 2 * 16 + j % 16]);
}

// Both blocks of pair p (one when the row ends there), packed nibbles.
inline __m256i load_q4_pair(const uint8_t* row, int64_t p, int64_t nb) {
  if (2 * p + 1 < nb) return load256(row + p * 32);
  return _mm256_set_m128i(_mm_setzero_si128(), load128(row + p * 32));
}

// A pair of q4 blocks times their activations (pair order): int32 lanes 0..3 sum block 2p's
// products, lanes 4..7 block 2p+1's.
inline __m256i q4_pair_dot(__m256i packed, const uint8_t* x) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256i lo = _mm256_and_si256(packed, low), hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
  const __m256i x_lo = load256(x), x_hi = load256(x + 32);
#if defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), lo, x_lo), hi, x_hi);
#else
  // Each int16 lane sums 4 products of a nibble and an int8, at most 4 * 15 * 127: no saturation.
  const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, x_lo), _mm256_maddubs_epi16(hi, x_hi));
  return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
#endif
}

// A q8_0 block times its activations: 8 int32 lanes of 4 products each.
inline __m256i q8_block_dot(__m256i w, const uint8_t* x) {
  // Unsigned times signed: |w| times x with w's sign; |w| <= 128, so an int16 pair sum is at most
  // 2 * 128 * 127 < 32767.
  const __m256i u = _mm256_sign_epi8(w, w), s = _mm256_sign_epi8(load256(x), w);
#if defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// Scales of q4 pair p from sw * dx of blocks (p / 2) * 4 .. +3: block 2p's 4 times, then 2p+1's.
inline __m256 pair_scales(__m128 s4, int64_t p) {
  const __m256i first = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), second = _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3);
  return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(s4), (p & 1) ? second : first);
}
inline __m128 block_products(const float* sw, const float* dx, int64_t p) {
  return _mm_mul_ps(_mm_loadu_ps(sw + p / 2 * 4), _mm_loadu_ps(dx + p / 2 * 4));
}

// y = (acc + acc_odd) + the block mins times the activations' block sums.
inline float finish_row(__m256 acc, __m256 acc_odd, const float* mw, const float* sums, int64_t nbp, bool with_mins) {
  __m256 mins = _mm256_setzero_ps();
  if (with_mins)
    for (int64_t j = 0; j < nbp; j += 8) mins = _mm256_fmadd_ps(_mm256_loadu_ps(mw + j), _mm256_loadu_ps(sums + j), mins);
  return hsum(_mm256_add_ps(_mm256_add_ps(acc, acc_odd), mins));
}

// 16 floats -> 16 bfloat16, round to nearest even (finite values).
inline __m256i to_bf16(__m256 a, __m256 b) {
  const auto round = [](__m256 v) {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    return _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  };
  return _mm256_permute4x64_epi64(_mm256_packus_epi32(round(a), round(b)), 0xD8);  // undo the per-lane pack
}

inline void store_block(float* o, const __m256 f[4]) {
  for (int i = 0; i < 4; ++i) _mm256_storeu_ps(o + 8 * i, f[i]);
}
inline void store_block(bf16* o, const __m256 f[4]) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), to_bf16(f[0], f[1]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 16), to_bf16(f[2], f[3]));
}

// sd[0] in lanes 0..3, sd[1] in lanes 4..7; one broadcast where both halves share a scale.
template <int64_t F> __m256 half_scales(const float* sd) {
  if constexpr (F != Q6_K) return _mm256_broadcast_ss(sd);
  const __m128 pair = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(sd)));
  return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(pair), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
}

// Byte e of the result is 0xFF where bit e of `bits` is set (llama.cpp's bytes_from_bits_32).
inline __m256i bit_mask_bytes(uint32_t bits) {
  const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(bits)),
                                             _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202, 0x0303030303030303));
  return _mm256_cmpeq_epi8(_mm256_or_si256(spread, _mm256_set1_epi64x(0x7FBFDFEFF7FBFDFE)), _mm256_set1_epi64x(-1));
}

// The wide formats' block primitives (see wide_matmul_int8): one block in a 256-bit register.
struct WideBlock {
  using C = __m256i;
  using Acc = __m256;
  using FAcc = __m256;
  // raw: q5_*, q6_k codes before their offset (0..31, 0..63), for unsigned products.
  template <int64_t F, bool raw = false> static __m256i codes(const uint8_t* row, const uint8_t* qh, int64_t b) {
    const __m128i packed = load128(row + b * 16);
    const __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), _mm256_set1_epi8(0x0F));
    if constexpr (is_iq4(F)) {
      return _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(load128(kIq4Levels)), q);
    } else {
      const uint8_t* planes = qh + b * Weight::qh_bytes_of(F);
      const __m256i high = F == Q6_K ? q6_high_bits(planes) : _mm256_and_si256(bit_mask_bytes(load_u32(planes)), _mm256_set1_epi8(16));
      const __m256i c = _mm256_or_si256(q, high);
      return wide_offset(F) && !raw ? _mm256_sub_epi8(c, _mm256_set1_epi8(wide_offset(F))) : c;
    }
  }
  template <int64_t F> static __m256 dot(__m256 acc, __m256i c, const uint8_t* xq, const float* sd) {
    // q8_block_dot's lanes 0..3 hold codes 0..15, lanes 4..7 the rest.
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(q8_block_dot(c, xq)), half_scales<F>(sd), acc);
  }
  static void widen(__m256i c, __m256 f[4]) {
    const __m128i lo = _mm256_castsi256_si128(c), hi = _mm256_extracti128_si256(c, 1);
    f[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
    f[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(lo, lo)));
    f[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
    f[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(hi, hi)));
  }
  static __m256 fdot(__m256 acc, __m256i c, const float* x, float s_lo, float s_hi) {
    __m256 f[4];
    widen(c, f);
    const __m256 lo = _mm256_fmadd_ps(f[1], _mm256_loadu_ps(x + 8), _mm256_mul_ps(f[0], _mm256_loadu_ps(x)));
    const __m256 hi = _mm256_fmadd_ps(f[3], _mm256_loadu_ps(x + 24), _mm256_mul_ps(f[2], _mm256_loadu_ps(x + 16)));
    return _mm256_fmadd_ps(hi, _mm256_set1_ps(s_hi), _mm256_fmadd_ps(lo, _mm256_set1_ps(s_lo), acc));
  }
  template <typename T> static void store(T* out, __m256i c, float s_lo, float s_hi, float mn) {
    __m256 f[4];
    widen(c, f);
    for (int i = 0; i < 4; ++i) f[i] = _mm256_fmadd_ps(f[i], _mm256_set1_ps(i < 2 ? s_lo : s_hi), _mm256_set1_ps(mn));
    store_block(out, f);
  }
  static float sum(__m256 a, __m256 b) { return hsum(_mm256_add_ps(a, b)); }
};

// q6_k blocks 2u and 2u + 1, as unsigned codes 0..63 in the q4 formats' pair order: lo = elements
// 0..15 of both blocks (the 32 low nibbles), hi = elements 16..31. One 32-byte load of nibbles and
// one of 16 bytes of high bits for 64 codes, 10 operations: the high bits of element 8k + i sit in
// bits 2k, 2k+1 of byte i, so with the pair's 8-byte groups in lanes [A A B B] a left shift by 4 or 2
// (lo) and a right shift by 0 or 2 (hi) put them at bits 4..5 (q6_high_bits does it one block at a
// time). Decoding q6_k 9216x3072, one thread, CPU time, A/B in one process on a loaded Xeon
// (2026-12-02): 2.85-2.91 ms against 3.48 with a block per unit and two bit planes; q4_k 1.85, so
// q6_k costs 1.58x q4_k for 1.46x its bytes (it was 2.0x on that machine, 2.5x on a Zen 5).
inline void q6_k_pair_codes(const uint8_t* row, const uint8_t* qh, int64_t u, __m256i& lo, __m256i& hi) {
  const __m256i low = _mm256_set1_epi8(0x0F), bits45 = _mm256_set1_epi8(0x30);
  const __m256i packed = load256(row + u * 32);
  const __m256i high = _mm256_permute4x64_epi64(_mm256_castsi128_si256(load128(qh + u * 16)), 0x50);  // [A A B B]
  lo = _mm256_or_si256(_mm256_and_si256(packed, low), _mm256_and_si256(_mm256_sllv_epi64(high, _mm256_setr_epi64x(4, 2, 4, 2)), bits45));
  hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(packed, 4), low),
                       _mm256_and_si256(_mm256_srlv_epi64(high, _mm256_setr_epi64x(0, 2, 0, 2)), bits45));
}

// --- Four weight rows at a time (every format but q8_0) ----------------------------------------------
// A prompt multiplies each weight block by many activation rows. Unpacking a block once per
// activation row, as a row-at-a-time kernel does, cost more than the products themselves; here a
// group of 4 weight rows is unpacked once per unit (below) and dotted with up to 4 activation rows
// held in registers (a 4 x 4 tile: 8 registers of unpacked weights, 4 accumulators). Decoding runs
// the same code with one activation row, so every row's float operations, and its bits, are the
// same whatever the number of rows in the call.
//
// A unit is 32 bytes of one row's codes giving 8 int32 lanes of partial sums: for q4 formats a
// pair of blocks (lanes 0..3 block 2p, 4..7 block 2p+1), for the wide ones one block unpacked
// to int8 (lanes 0..3 its codes 0..15, 4..7 the rest: q6_k's two scales). Three integer
// horizontal adds turn the 4 rows' lane vectors into [row 0..3 part 0 | row 0..3 part 1], exact
// sums, so one float multiply-add per unit serves 4 rows; the group's scales are transposed to
// that order once per group. Per row the float sum is: sum over units of part 0 (one chain) plus
// part 1, plus the mins (mw . xs) in 8 partial sums.
constexpr int64_t kGroupRows = 4;
// Activation rows per tile. The wide formats hold 4 registers of unpacked weights, which leaves
// room for 8 accumulators (q6_k 3072x3072 times 64 rows, one thread: 14.2 ms with tiles of 4
// rows, 11.6 with 6, 11.1-11.6 with 8; q5_k 11.0, 10.1, 9.3). q4 formats hold 8, and 6 rows spill
// a little but still win (q4_0 3072x3072 times 96 rows: 9.4 ms with 4 in chunks of 16, 8.4 with 6
// in chunks of 24, quant_cpu.cpp's kRowChunk).
// q6_k holds 8 (two blocks per unit, q6_k_pair_codes), so it takes 6 too.
constexpr int tile_rows(int64_t fmt) { return fmt == Q4_0 || fmt == Q4_1 || fmt == Q4_K || fmt == Q6_K ? 6 : 8; }

constexpr bool q4_format(int64_t fmt) { return fmt == Q4_0 || fmt == Q4_1 || fmt == Q4_K; }

// acc + 4-product sums of unsigned bytes u times signed bytes s, in 8 int32 lanes (without
// VNNI: u at most 128 where s can reach -128 or 127, or the int16 pair sums could saturate).
inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}
inline __m256i dot_u8s8(__m256i u, __m256i s) { return dot_u8s8(_mm256_setzero_si256(), u, s); }

// Unpacked q4 pair (low and high nibbles) times its activations in pair order, as q4_pair_dot.
inline __m256i q4_unit_dot(__m256i lo, __m256i hi, const uint8_t* x) {
#if defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), lo, load256(x)), hi, load256(x + 32));
#else
  const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, load256(x)), _mm256_maddubs_epi16(hi, load256(x + 32)));
  return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
#endif
}

// [v0 lanes 0..3 summed, v1's, v2's, v3's | the same of lanes 4..7]: exact integers. Unpacks and
// adds, not vphaddd: three of those made q4_0 3072x3072 times 64 rows 7.0-7.4 ms on one Zen 5
// thread, these 5.9-6.1.
inline __m256i reduce4(__m256i v0, __m256i v1, __m256i v2, __m256i v3) {
  const __m256i t0 = _mm256_add_epi32(_mm256_unpacklo_epi32(v0, v1), _mm256_unpackhi_epi32(v0, v1));
  const __m256i t1 = _mm256_add_epi32(_mm256_unpacklo_epi32(v2, v3), _mm256_unpackhi_epi32(v2, v3));
  return _mm256_add_epi32(_mm256_unpacklo_epi64(t0, t1), _mm256_unpackhi_epi64(t0, t1));
}

// out[i] = [a0[j+i], a1[j+i], a2[j+i], a3[j+i]] for i < 8.
inline void transpose4x8(const float* const a[4], int64_t j, __m128 out[8]) {
  const __m256 r0 = _mm256_loadu_ps(a[0] + j), r1 = _mm256_loadu_ps(a[1] + j);
  const __m256 r2 = _mm256_loadu_ps(a[2] + j), r3 = _mm256_loadu_ps(a[3] + j);
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpacklo_ps(r2, r3);
  const __m256 t2 = _mm256_unpackhi_ps(r0, r1), t3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 u[4] = {_mm256_shuffle_ps(t0, t1, 0x44), _mm256_shuffle_ps(t0, t1, 0xEE),
                       _mm256_shuffle_ps(t2, t3, 0x44), _mm256_shuffle_ps(t2, t3, 0xEE)};
  for (int i = 0; i < 4; ++i) {
    out[i] = _mm256_castps256_ps128(u[i]);
    out[i + 4] = _mm256_extractf128_ps(u[i], 1);
  }
}

// Block scales of the K formats with int8 or 6-bit scales, 8 at a time (wide_scales' loop).
template <int64_t F>
void group_row_scales(const Weight& w, int64_t n, float* s, float* mw) {
  if constexpr (F == Q6_K || F == IQ4_XS || F == Q5_K) {
    constexpr int64_t per = 8 * halves(F);
    const int64_t nb = w.nb, first = n * nb;
    for (int64_t g = 0; g < nb / 8; ++g) {
      const int64_t sb = first / 8 + g;
      const __m256 d = _mm256_set1_ps(half_to_float(w.dm[F == Q5_K ? 2 * sb : sb]));
      const uint8_t* sc = w.sc + (first + 8 * g) * halves(F);
      for (int64_t j = 0; j < per; j += 8) {
        const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(sc + j));
        const __m256i v = F == Q5_K ? _mm256_cvtepu8_epi32(bytes) : _mm256_cvtepi8_epi32(bytes);
        _mm256_storeu_ps(s + g * per + j, _mm256_mul_ps(d, _mm256_cvtepi32_ps(v)));
      }
      if constexpr (F == Q5_K) {
        const __m256 dmin = _mm256_set1_ps(-half_to_float(w.dm[2 * sb + 1]));
        _mm256_storeu_ps(mw + 8 * g, _mm256_mul_ps(dmin, load_bytes_as_floats(w.mn + first + 8 * g)));
      }
    }
  } else if constexpr (q4_format(F)) {
    row_scales(w, n, s, mw);
  } else {
    wide_scales<F>(w, n, s, mw);
  }
}

// A group's rows and their transposed scales.
template <int64_t F>
struct Group {
  static constexpr bool q4 = q4_format(F);
  static constexpr bool mins = q4 || has_min(F);
  static constexpr bool pairs = q4 || F == Q6_K;  // a unit is two blocks (q6_k_pair_codes)
  const Weight& w;
  int64_t nb, nbp, units, sp;   // blocks, padded blocks, units per row, scales per row (padded)
  const uint8_t* rows[kGroupRows];
  const uint8_t* qhs[kGroupRows];
  std::vector<float> s, mw, S;  // per row: sp scales, nbp mins; per unit 8 scales
  // Decoding prefetches each row's stream at the same place in the next group's row: one group
  // ahead. (kPrefetchAhead bytes ahead in the same row, as the one-row kernels do, lands in this
  // group's own rows once rows are shorter than that: q4_0 3072x8192 decoded in 0.96 ms against
  // the one-row kernel's 0.60, one thread.)
  int64_t ahead = 0, qh_ahead = 0;
  void prefetch(int r, int64_t b) const {  // wide formats: qs every 4 blocks, qh every 64 bytes
    constexpr int64_t qb = Weight::qh_bytes_of(F);
    if (b % 4 == 0) _mm_prefetch(reinterpret_cast<const char*>(rows[r] + b * 16 + ahead), _MM_HINT_T1);
    if constexpr (qb != 0)
      if (b % (64 / qb) == 0) _mm_prefetch(reinterpret_cast<const char*>(qhs[r] + b * qb + qh_ahead), _MM_HINT_T1);
  }
  explicit Group(const Weight& wt) : w(wt) {
    nb = w.nb; nbp = round_up(nb, 8);
    units = pairs ? (nb + 1) / 2 : nb;
    sp = round_up(halves(F) * nb, 8);
    s.assign(kGroupRows * sp, 0.f);
    mw.assign(kGroupRows * nbp, 0.f);
    S.assign(F == Q6_K ? 4 * sp : 8 * (q4 ? nbp / 2 : round_up(nb, 8)), 0.f);
    ahead = kGroupRows * w.row_bytes();
    qh_ahead = kGroupRows * nb * w.qh_bytes();
  }
  // Rows n0 .. n0 + 3; past `last` the last row repeats (its results are not stored).
  void load(int64_t n0, int64_t last) {
    const float* a[kGroupRows];
    for (int64_t r = 0; r < kGroupRows; ++r) {
      const int64_t n = std::min(n0 + r, last);
      rows[r] = w.qs + n * w.row_bytes();
      qhs[r] = w.qh ? wide_qh_row(w, n) : nullptr;
      group_row_scales<F>(w, n, s.data() + r * sp, mw.data() + r * nbp);
      a[r] = s.data() + r * sp;
    }
    __m128 t[8];
    for (int64_t j = 0; j < sp; j += 8) {
      transpose4x8(a, j, t);
      if constexpr (F == Q6_K) {
        // Entries j..j+7 are blocks j/2..j/2+3, two halves each: units j/4 and j/4 + 1. Per unit
        // 16 scales: its low halves' [block 2u | block 2u + 1], then its high halves'.
        float* o = S.data() + 4 * j;
        _mm256_storeu_ps(o, _mm256_set_m128(t[2], t[0]));
        _mm256_storeu_ps(o + 8, _mm256_set_m128(t[3], t[1]));
        _mm256_storeu_ps(o + 16, _mm256_set_m128(t[6], t[4]));
        _mm256_storeu_ps(o + 24, _mm256_set_m128(t[7], t[5]));
      } else if constexpr (q4) {  // scale entries 2u, 2u + 1 are unit u's two parts
        for (int i = 0; i < 4; ++i) _mm256_storeu_ps(S.data() + 8 * (j / 2 + i), _mm256_set_m128(t[2 * i + 1], t[2 * i]));
      } else {  // one scale per block, both parts
        for (int i = 0; i < 8; ++i) _mm256_storeu_ps(S.data() + 8 * (j + i), _mm256_set_m128(t[i], t[i]));
      }
    }
  }
  // [y of rows 0..3 without mins] from a tile accumulator, plus the mins.
  __m128 finish(__m256 acc, const float* xs) const {
    __m128 y = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    if constexpr (mins) {
      const float* m = mw.data();
      __m256 p0 = _mm256_setzero_ps(), p1 = p0, p2 = p0, p3 = p0;
      for (int64_t j = 0; j < nbp; j += 8) {
        const __m256 x = _mm256_loadu_ps(xs + j);
        p0 = _mm256_fmadd_ps(_mm256_loadu_ps(m + j), x, p0);
        p1 = _mm256_fmadd_ps(_mm256_loadu_ps(m + nbp + j), x, p1);
        p2 = _mm256_fmadd_ps(_mm256_loadu_ps(m + 2 * nbp + j), x, p2);
        p3 = _mm256_fmadd_ps(_mm256_loadu_ps(m + 3 * nbp + j), x, p3);
      }
      const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(p0, p1), _mm256_hadd_ps(p2, p3));
      y = _mm_add_ps(y, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
    }
    return y;
  }
};

// R activation rows from m0 against the group: acc[m] = [rows 0..3 part 0 | part 1] summed over units.
template <int64_t F, int R>
inline void group_tile(const Group<F>& g, const QuantizedRows& xr, int64_t m0, bool prefetch, __m256 out[R]) {
  const uint8_t* xq[R];
  const float* dx[R];
  __m256 acc[R];  // local, so that they live in registers
  for (int m = 0; m < R; ++m) {
    xq[m] = xr.q.data() + (m0 + m) * xr.row_q;
    dx[m] = xr.dx.data() + (m0 + m) * xr.nbp;
    acc[m] = _mm256_setzero_ps();
  }
  const int64_t nb = g.nb;
  for (int64_t u = 0; u < g.units; ++u) {
    const __m256 su = _mm256_loadu_ps(g.S.data() + (F == Q6_K ? 16 : 8) * u);
    if constexpr (Group<F>::q4) {
      const __m256i low = _mm256_set1_epi8(0x0F);
      const __m256i spread = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);  // dx of blocks 2u, 2u + 1
      __m256i lo[kGroupRows], hi[kGroupRows];
      for (int r = 0; r < kGroupRows; ++r) {
        const __m256i packed = load_q4_pair(g.rows[r], u, nb);
        lo[r] = _mm256_and_si256(packed, low);
        hi[r] = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
        if (prefetch && !(u & 1)) _mm_prefetch(reinterpret_cast<const char*>(g.rows[r] + u * 32 + g.ahead), _MM_HINT_T1);
      }
#pragma GCC unroll 4
      for (int m = 0; m < R; ++m) {
        const uint8_t* x = xq[m] + u * 64;
        const __m256i h = reduce4(q4_unit_dot(lo[0], hi[0], x), q4_unit_dot(lo[1], hi[1], x),
                                  q4_unit_dot(lo[2], hi[2], x), q4_unit_dot(lo[3], hi[3], x));
        const __m256 dxv = _mm256_permutevar8x32_ps(
            _mm256_castpd_ps(_mm256_broadcast_sd(reinterpret_cast<const double*>(dx[m] + 2 * u))), spread);
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h), _mm256_mul_ps(su, dxv), acc[m]);
      }
    } else if constexpr (F == Q6_K) {
      // Pairs of blocks as the q4 formats, but the low and high halves have their own scales, so
      // they are reduced apart: [rows 0..3 of block 2u | of 2u + 1] for codes 0..15, then 16..31.
      // Raw codes (0..63) times x with -32 * x's 4-code sums as the starting value, as below.
      const __m256i spread = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);  // dx of blocks 2u, 2u + 1
      const __m256 s_lo = su, s_hi = _mm256_loadu_ps(g.S.data() + 16 * u + 8);
      __m256i lo[kGroupRows], hi[kGroupRows];
      for (int r = 0; r < kGroupRows; ++r) {
        q6_k_pair_codes(g.rows[r], g.qhs[r], u, lo[r], hi[r]);
        if (prefetch && !(u & 1)) _mm_prefetch(reinterpret_cast<const char*>(g.rows[r] + u * 32 + g.ahead), _MM_HINT_T1);
        if (prefetch && !(u & 3)) _mm_prefetch(reinterpret_cast<const char*>(g.qhs[r] + u * 16 + g.qh_ahead), _MM_HINT_T1);
      }
#pragma GCC unroll 6
      for (int m = 0; m < R; ++m) {
        const uint8_t* x = xq[m] + u * 64;
        const __m256i x_lo = load256(x), x_hi = load256(x + 32);
        const __m256i z_lo = _mm256_sub_epi32(_mm256_setzero_si256(), dot_u8s8(_mm256_set1_epi8(32), x_lo));
        const __m256i z_hi = _mm256_sub_epi32(_mm256_setzero_si256(), dot_u8s8(_mm256_set1_epi8(32), x_hi));
        const __m256i h_lo = reduce4(dot_u8s8(z_lo, lo[0], x_lo), dot_u8s8(z_lo, lo[1], x_lo),
                                     dot_u8s8(z_lo, lo[2], x_lo), dot_u8s8(z_lo, lo[3], x_lo));
        const __m256i h_hi = reduce4(dot_u8s8(z_hi, hi[0], x_hi), dot_u8s8(z_hi, hi[1], x_hi),
                                     dot_u8s8(z_hi, hi[2], x_hi), dot_u8s8(z_hi, hi[3], x_hi));
        const __m256 dxv = _mm256_permutevar8x32_ps(
            _mm256_castpd_ps(_mm256_broadcast_sd(reinterpret_cast<const double*>(dx[m] + 2 * u))), spread);
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h_lo), _mm256_mul_ps(s_lo, dxv), acc[m]);
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h_hi), _mm256_mul_ps(s_hi, dxv), acc[m]);
      }
    } else if constexpr (is_iq4(F)) {  // signed levels: |w| times x with w's sign
      __m256i c[kGroupRows], a[kGroupRows];
      for (int r = 0; r < kGroupRows; ++r) {
        c[r] = WideBlock::codes<F>(g.rows[r], g.qhs[r], u);
        a[r] = _mm256_sign_epi8(c[r], c[r]);
        if (prefetch) g.prefetch(r, u);
      }
#pragma GCC unroll 8
      for (int m = 0; m < R; ++m) {
        const __m256i x = load256(xq[m] + u * kBlock);
        const __m256i h = reduce4(dot_u8s8(a[0], _mm256_sign_epi8(x, c[0])), dot_u8s8(a[1], _mm256_sign_epi8(x, c[1])),
                                  dot_u8s8(a[2], _mm256_sign_epi8(x, c[2])), dot_u8s8(a[3], _mm256_sign_epi8(x, c[3])));
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h), _mm256_mul_ps(su, _mm256_broadcast_ss(dx[m] + u)), acc[m]);
      }
    } else {
      // q5_*, q6_k: the raw codes (unsigned, before the offset o) times x, with -o * x's 4-code
      // sums as each row's starting value, so the reduced sums are sum((q - o) x) exactly: two
      // operations per activation row instead of a sign flip per weight row. (Reading those sums
      // precomputed, 32 bytes per block, was slower: q6_k is bound by loads from L2.)
      __m256i q[kGroupRows];
      for (int r = 0; r < kGroupRows; ++r) {
        q[r] = WideBlock::codes<F, true>(g.rows[r], g.qhs[r], u);
        if (prefetch) g.prefetch(r, u);
      }
#pragma GCC unroll 8
      for (int m = 0; m < R; ++m) {
        const __m256i x = load256(xq[m] + u * kBlock);
        __m256i z = _mm256_setzero_si256();
        if constexpr (wide_offset(F) != 0) z = _mm256_sub_epi32(z, dot_u8s8(_mm256_set1_epi8(wide_offset(F)), x));
        const __m256i h = reduce4(dot_u8s8(z, q[0], x), dot_u8s8(z, q[1], x), dot_u8s8(z, q[2], x), dot_u8s8(z, q[3], x));
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h), _mm256_mul_ps(su, _mm256_broadcast_ss(dx[m] + u)), acc[m]);
      }
    }
  }
  for (int m = 0; m < R; ++m) out[m] = acc[m];
}

template <int64_t F, int R>
inline void group_rows(const Group<F>& g, const QuantizedRows& xr, int64_t m0, bool prefetch, float* y, int64_t N,
                       int64_t n0, int64_t valid) {
  __m256 acc[R];
  group_tile<F, R>(g, xr, m0, prefetch, acc);
  for (int m = 0; m < R; ++m) {
    const __m128 out = g.finish(acc[m], xr.xs.data() + (m0 + m) * xr.nbp);
    float* yo = y + (m0 + m) * N + n0;
    if (valid == kGroupRows) {
      _mm_storeu_ps(yo, out);
    } else {
      alignas(16) float tmp[4];
      _mm_store_ps(tmp, out);
      for (int64_t r = 0; r < valid; ++r) yo[r] = tmp[r];
    }
  }
}

template <int64_t F>
void grouped_matmul_int8(const Weight& w, const QuantizedRows& xr, float* y, int64_t n_begin, int64_t n_end) {
  Group<F> g(w);
  const int64_t M = xr.M;
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kGroupRows) {
    g.load(n0, n_end - 1);
    const int64_t valid = std::min(kGroupRows, n_end - n0);
    constexpr int T = tile_rows(F);
    int64_t m0 = 0;
    for (; m0 + T <= M; m0 += T) group_rows<F, T>(g, xr, m0, m0 == 0, y, w.N, n0, valid);
    const int64_t left = M - m0;
    if (T > 7 && left == 7) group_rows<F, (T > 7 ? 7 : 1)>(g, xr, m0, m0 == 0, y, w.N, n0, valid);
    if (T > 6 && left == 6) group_rows<F, (T > 6 ? 6 : 1)>(g, xr, m0, m0 == 0, y, w.N, n0, valid);
    if (T > 5 && left == 5) group_rows<F, (T > 5 ? 5 : 1)>(g, xr, m0, m0 == 0, y, w.N, n0, valid);
    if (T > 4 && left == 4) group_rows<F, (T > 4 ? 4 : 1)>(g, xr, m0, m0 == 0, y, w.N, n0, valid);
    if (left == 3) group_rows<F, 3>(g, xr, m0, m0 == 0, y, w.N, n0, valid);
    if (left == 2) group_rows<F, 2>(g, xr, m0, m0 == 0, y, w.N, n0, valid);
    if (left == 1) group_rows<F, 1>(g, xr, m0, m0 == 0, y, w.N, n0, valid);
  }
}

// One weight row at a time (the kernels before the tiles above): decoding's q4_*, q5_0, q5_1,
// iq4_nl and q8_0. At one activation row they beat the tiles, which pay per group of 4 rows for
// their transposed scales and mins (one Zen 5 thread, 9216x3072, CPU time, both kernels in one
// process alternating, busy machine: row/tile 0.56/0.70 ms q4_0, 0.60/0.79 q4_1, 0.67/0.81 q4_k,
// 1.16/1.29 q5_0, 1.17/1.27 q5_1, 0.87/1.03 iq4_nl); q5_k, q6_k and iq4_xs decode faster tiled
// (1.76/1.46, 2.12/1.69, 1.12/1.00), their row path converting every block's scale per row. (q6_k's
// tiles now take two blocks per unit: q6_k_pair_codes.)
inline void row_matmul_int8(const Weight& w, const QuantizedRows& xr, float* y, int64_t n_begin, int64_t n_end) {
  if (w.wide()) return with_wide_format<WideInt8, WideBlock>(w.fmt, w, xr, y, n_begin, n_end);
  const int64_t nb = w.nb, N = w.N, M = xr.M, nbp = xr.nbp, row_q = xr.row_q;
  std::vector<float> sw(nbp), mw(nbp);
  std::vector<__m256> acc(M), acc_odd(M);
  for (int64_t n = n_begin; n < n_end; ++n) {
    row_scales(w, n, sw.data(), mw.data());
    const uint8_t* row = w.qs + n * w.row_bytes();
    if (w.q4()) {
      // Pairs of blocks (32 bytes of weights); two pairs per step, into two accumulators, while
      // both are whole; the rest into the first. The prefetch is AVX-512's: without it medium's
      // down projection (K = 17920) streamed at 9 GB/s on one thread instead of 17.5.
      const int64_t pairs = (nb + 1) / 2, paired = nb / 4 * 2;
      if (M == 1) {
        const uint8_t* xq = xr.q.data();
        const float* dx = xr.dx.data();
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        int64_t p = 0;
        for (; p < paired; p += 2) {
          _mm_prefetch(reinterpret_cast<const char*>(row + p * 32 + kPrefetchAhead), _MM_HINT_T1);
          const __m128 s4 = block_products(sw.data(), dx, p);
          const __m256i i0 = q4_pair_dot(load256(row + p * 32), xq + p * 64);
          const __m256i i1 = q4_pair_dot(load256(row + p * 32 + 32), xq + p * 64 + 64);
          acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i0), pair_scales(s4, p), acc0);
          acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i1), pair_scales(s4, p + 1), acc1);
        }
        for (; p < pairs; ++p) {
          const __m256i i0 = q4_pair_dot(load_q4_pair(row, p, nb), xq + p * 64);
          acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i0), pair_scales(block_products(sw.data(), dx, p), p), acc0);
        }
        acc[0] = acc0;
        acc_odd[0] = acc1;
      } else {
        for (int64_t m = 0; m < M; ++m) acc[m] = acc_odd[m] = _mm256_setzero_ps();
        for (int64_t p = 0; p < pairs; ++p) {
          const __m256i packed = load_q4_pair(row, p, nb);
          std::vector<__m256>& into = (p < paired && (p & 1)) ? acc_odd : acc;
          for (int64_t m = 0; m < M; ++m) {
            const __m256i i0 = q4_pair_dot(packed, xr.q.data() + m * row_q + p * 64);
            const __m256 s = pair_scales(block_products(sw.data(), xr.dx.data() + m * nbp, p), p);
            into[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i0), s, into[m]);
          }
        }
      }
    } else {
      // One block (32 bytes) at a time, alternating accumulators while blocks come in twos.
      const int64_t paired = nb / 2 * 2;
      if (M == 1) {
        const uint8_t* xq = xr.q.data();
        const float* dx = xr.dx.data();
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        int64_t b = 0;
        for (; b < paired; b += 2) {
          _mm_prefetch(reinterpret_cast<const char*>(row + b * kBlock + kPrefetchAhead), _MM_HINT_T1);
          const __m256i i0 = q8_block_dot(load256(row + b * kBlock), xq + b * kBlock);
          const __m256i i1 = q8_block_dot(load256(row + b * kBlock + kBlock), xq + b * kBlock + kBlock);
          acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i0), _mm256_set1_ps(sw[b] * dx[b]), acc0);
          acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i1), _mm256_set1_ps(sw[b + 1] * dx[b + 1]), acc1);
        }
        if (b < nb) {
          const __m256i i0 = q8_block_dot(load256(row + b * kBlock), xq + b * kBlock);
          acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i0), _mm256_set1_ps(sw[b] * dx[b]), acc0);
        }
        acc[0] = acc0;
        acc_odd[0] = acc1;
      } else {
        for (int64_t m = 0; m < M; ++m) acc[m] = acc_odd[m] = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; ++b) {
          const __m256i q = load256(row + b * kBlock);
          std::vector<__m256>& into = (b < paired && (b & 1)) ? acc_odd : acc;
          for (int64_t m = 0; m < M; ++m) {
            const __m256i i0 = q8_block_dot(q, xr.q.data() + m * row_q + b * kBlock);
            into[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i0), _mm256_set1_ps(sw[b] * xr.dx[m * nbp + b]), into[m]);
          }
        }
      }
    }
    for (int64_t m = 0; m < M; ++m)
      y[m * N + n] = finish_row(acc[m], acc_odd[m], mw.data(), xr.xs.data() + m * nbp, nbp, w.fmt != Q8_0);
  }
}

// Prompts (several tokens per sequence): the tiles, for every format but q8_0.
inline void matmul_int8_rows(const Weight& w, const QuantizedRows& xr, float* y, int64_t n_begin, int64_t n_end) {
  switch (w.fmt) {
    case Q4_0: return grouped_matmul_int8<Q4_0>(w, xr, y, n_begin, n_end);
    case Q4_1: return grouped_matmul_int8<Q4_1>(w, xr, y, n_begin, n_end);
    case Q4_K: return grouped_matmul_int8<Q4_K>(w, xr, y, n_begin, n_end);
    case Q5_0: return grouped_matmul_int8<Q5_0>(w, xr, y, n_begin, n_end);
    case Q5_1: return grouped_matmul_int8<Q5_1>(w, xr, y, n_begin, n_end);
    case Q5_K: return grouped_matmul_int8<Q5_K>(w, xr, y, n_begin, n_end);
    case Q6_K: return grouped_matmul_int8<Q6_K>(w, xr, y, n_begin, n_end);
    case IQ4_NL: return grouped_matmul_int8<IQ4_NL>(w, xr, y, n_begin, n_end);
    case IQ4_XS: return grouped_matmul_int8<IQ4_XS>(w, xr, y, n_begin, n_end);
    default: return row_matmul_int8(w, xr, y, n_begin, n_end);  // q8_0
  }
}

// Decoding (one token per sequence; xr's rows are separate sequences): each format's faster
// kernel at one row (see row_matmul_int8). Either kernel gives a row the same bits in any batch.
inline void matmul_int8_decode(const Weight& w, const QuantizedRows& xr, float* y, int64_t n_begin, int64_t n_end) {
  switch (w.fmt) {
    case Q5_K: return grouped_matmul_int8<Q5_K>(w, xr, y, n_begin, n_end);
    case Q6_K: return grouped_matmul_int8<Q6_K>(w, xr, y, n_begin, n_end);
    case IQ4_XS: return grouped_matmul_int8<IQ4_XS>(w, xr, y, n_begin, n_end);
    default: return row_matmul_int8(w, xr, y, n_begin, n_end);
  }
}

inline FloatRows prepare_float_rows(const float* x, int64_t M, int64_t K) {
  const int64_t nb = K / kBlock, nbp = round_up(nb, 8);
  FloatRows r{x, M, K, nbp, std::vector<float>(M * nbp, 0.f)};
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + m * K + b * kBlock;
      const __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(xb), _mm256_loadu_ps(xb + 8)),
                                     _mm256_add_ps(_mm256_loadu_ps(xb + 16), _mm256_loadu_ps(xb + 24)));
      r.sums[m * nbp + b] = hsum(s);
    }
  return r;
}

// Block b of a row widened to float: elements 8i..8i+7 in f[i] (codes, before scale).
inline void widen_block(bool q4, const uint8_t* row, int64_t b, __m256 f[4]) {
  if (q4) {
    const __m128i packed = load128(row + b * 16), low = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(packed, low), hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low);
    f[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    f[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    f[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    f[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
  } else {
    for (int i = 0; i < 4; ++i)
      f[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(static_cast<const __m128i*>(
          static_cast<const void*>(row + b * kBlock + 8 * i)))));
  }
}

inline __m256 block_dot(const __m256 f[4], const float* xb) {
  __m256 dot = _mm256_mul_ps(f[0], _mm256_loadu_ps(xb));
  for (int i = 1; i < 4; ++i) dot = _mm256_fmadd_ps(f[i], _mm256_loadu_ps(xb + 8 * i), dot);
  return dot;
}

// Exact path: codes widened to float against float x.
inline void matmul_float_rows(const Weight& w, const FloatRows& xr, float* y, int64_t n_begin, int64_t n_end) {
  if (w.wide()) return with_wide_format<WideFloat, WideBlock>(w.fmt, w, xr, y, n_begin, n_end);
  const int64_t K = w.K, nb = w.nb, N = w.N, M = xr.M, nbp = xr.nbp;
  std::vector<float> sw(nbp), mw(nbp);
  std::vector<__m256> acc(M), acc_odd(M);
  for (int64_t n = n_begin; n < n_end; ++n) {
    row_scales(w, n, sw.data(), mw.data());
    const uint8_t* row = w.qs + n * w.row_bytes();
    __m256 f[4];
    if (M == 1) {
      // Decoding: accumulators in registers, alternating between two for independent chains.
      __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
      for (int64_t b = 0; b < nb; ++b) {
        widen_block(w.q4(), row, b, f);
        const __m256 dot = block_dot(f, xr.x + b * kBlock);
        if (b & 1) acc1 = _mm256_fmadd_ps(dot, _mm256_set1_ps(sw[b]), acc1);
        else acc0 = _mm256_fmadd_ps(dot, _mm256_set1_ps(sw[b]), acc0);
      }
      acc[0] = acc0;
      acc_odd[0] = acc1;
    } else {
      for (int64_t m = 0; m < M; ++m) acc[m] = acc_odd[m] = _mm256_setzero_ps();
      for (int64_t b = 0; b < nb; ++b) {
        widen_block(w.q4(), row, b, f);
        std::vector<__m256>& into = (b & 1) ? acc_odd : acc;
        for (int64_t m = 0; m < M; ++m)
          into[m] = _mm256_fmadd_ps(block_dot(f, xr.x + m * K + b * kBlock), _mm256_set1_ps(sw[b]), into[m]);
      }
    }
    for (int64_t m = 0; m < M; ++m)
      y[m * N + n] = finish_row(acc[m], acc_odd[m], mw.data(), xr.sums.data() + m * nbp, nbp, true);
  }
}

template <typename T>
void dequantize_rows(const Weight& w, T* out, int64_t n_begin, int64_t n_end) {
  if (w.wide()) return with_wide_format<WideDequantize, WideBlock>(w.fmt, w, out, n_begin, n_end);
  const int64_t nbp = round_up(w.nb, 8);
  std::vector<float> sw(nbp), mw(nbp);
  for (int64_t n = n_begin; n < n_end; ++n) {
    row_scales(w, n, sw.data(), mw.data());
    const uint8_t* row = w.qs + n * w.row_bytes();
    for (int64_t b = 0; b < w.nb; ++b) {
      const __m256 s = _mm256_set1_ps(sw[b]), mn = _mm256_set1_ps(mw[b]);  // q8_0: min 0
      __m256 f[4];
      widen_block(w.q4(), row, b, f);
      for (int i = 0; i < 4; ++i) f[i] = _mm256_fmadd_ps(f[i], s, mn);
      store_block(out + n * w.K + b * kBlock, f);
    }
  }
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16* p) {  // bfloat16 is the top half of a float32
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(load128(p)), 16));
}
inline __m256 load8(const half* p) { return _mm256_cvtph_ps(load128(p)); }

template <typename T, typename C>
void attend_head(const T* q, const C* kb, const C* vb, const bool* allowed, T* out, int64_t S, int64_t hd,
                 float scale, float* p) {
  const int64_t chunks = hd / 8;
  __m256 qv[16], acc[16];
  for (int64_t c = 0; c < chunks; ++c) qv[c] = _mm256_mul_ps(load8(q + c * 8), _mm256_set1_ps(scale));
  float mx = -INFINITY;
  for (int64_t s = 0; s < S; ++s) {
    if (allowed && !allowed[s]) { p[s] = -INFINITY; continue; }
    const C* ks = kb + s * hd;
    __m256 dot = _mm256_mul_ps(qv[0], load8(ks));
    for (int64_t c = 1; c < chunks; ++c) dot = _mm256_fmadd_ps(qv[c], load8(ks + c * 8), dot);
    p[s] = hsum(dot);
    mx = std::max(mx, p[s]);
  }
  float total = 0.f;
  for (int64_t s = 0; s < S; ++s) { p[s] = std::exp(p[s] - mx); total += p[s]; }
  for (int64_t c = 0; c < chunks; ++c) acc[c] = _mm256_setzero_ps();
  for (int64_t s = 0; s < S; ++s) {
    if (p[s] == 0.f) continue;
    const __m256 ps = _mm256_set1_ps(p[s]);
    const C* vs = vb + s * hd;
    for (int64_t c = 0; c < chunks; ++c) acc[c] = _mm256_fmadd_ps(ps, load8(vs + c * 8), acc[c]);
  }
  alignas(32) float tmp[8];
  for (int64_t c = 0; c < chunks; ++c) {
    _mm256_store_ps(tmp, _mm256_mul_ps(acc[c], _mm256_set1_ps(1.f / total)));
    for (int64_t d = 0; d < 8; ++d) out[c * 8 + d] = from_float<T>(tmp[d]);
  }
}

}  // namespace avx2
#endif  // PHI3_AVX2

// --- NEON (aarch64; sdot where the dot-product extension is enabled) --------------------------------

#if defined(PHI3_NEON)
namespace neon {

inline float32x4_t load_halves(const uint16_t* p, int64_t count) {  // count > 4: the first 4
  uint16_t padded[4] = {};
  std::memcpy(padded, p, std::min<int64_t>(count, 4) * sizeof(uint16_t));
  return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(padded)));
}
inline float32x4_t load_bytes_as_floats(const uint8_t* p) {  // 4 unsigned bytes
  uint8_t padded[8] = {};
  std::memcpy(padded, p, 4);
  return vcvtq_f32_u32(vmovl_u16(vget_low_u16(vmovl_u8(vld1_u8(padded)))));
}

// Float scale and min of each block of row n into sw, mw (round_up(nb, 4) entries, zero-padded).
inline void row_scales(const Weight& w, int64_t n, float* sw, float* mw) {
  const int64_t nb = w.nb;
  for (int64_t j = 0; j < nb; j += 4) {
    float32x4_t s, mn;
    if (w.fmt == Q4_K) {  // nb is a multiple of 8: blocks j..j+3 are in one super-block
      const uint16_t* dm = w.dm + (n * nb + j) / 8 * 2;
      s = vmulq_n_f32(load_bytes_as_floats(w.sc + n * nb + j), half_to_float(dm[0]));
      mn = vmulq_n_f32(load_bytes_as_floats(w.mn + n * nb + j), -half_to_float(dm[1]));
    } else {
      s = load_halves(w.d + n * nb + j, nb - j);
      if (w.fmt == Q4_0) mn = vmulq_n_f32(s, -8.f);
      else if (w.fmt == Q4_1) mn = load_halves(w.m + n * nb + j, nb - j);
      else mn = vdupq_n_f32(0.f);
    }
    vst1q_f32(sw + j, s);
    vst1q_f32(mw + j, mn);
  }
}

// Codes per row: nb * 32 bytes, natural order, signed.
inline QuantizedRows quantize_rows(const float* x, int64_t M, int64_t K, Format) {
  QuantizedRows r;
  r.M = M; r.nb = K / kBlock; r.nbp = round_up(r.nb, 4); r.row_q = K;
  r.q.assign(M * K, 0);
  r.dx.assign(M * r.nbp, 0.f);
  r.xs.assign(M * r.nbp, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < r.nb; ++b) {
      const float* xb = x + m * K + b * kBlock;
      float32x4_t v[8], amax = vdupq_n_f32(0.f);
      for (int i = 0; i < 8; ++i) {
        v[i] = vld1q_f32(xb + 4 * i);
        amax = vmaxq_f32(amax, vabsq_f32(v[i]));
      }
      const float d = vmaxvq_f32(amax) / 127.f;
      const float id = d != 0.f ? 1.f / d : 0.f;
      int32x4_t c[8], sum = vdupq_n_s32(0);
      for (int i = 0; i < 8; ++i) {
        c[i] = vcvtnq_s32_f32(vmulq_n_f32(v[i], id));  // round to nearest, ties to even
        sum = vaddq_s32(sum, c[i]);
      }
      int8_t* out = reinterpret_cast<int8_t*>(r.q.data()) + m * K + b * kBlock;
      for (int h = 0; h < 2; ++h) {
        const int16x8_t a = vcombine_s16(vmovn_s32(c[4 * h]), vmovn_s32(c[4 * h + 1]));
        const int16x8_t e = vcombine_s16(vmovn_s32(c[4 * h + 2]), vmovn_s32(c[4 * h + 3]));
        vst1q_s8(out + 16 * h, vcombine_s8(vmovn_s16(a), vmovn_s16(e)));
      }
      const float dr = half_to_float(float_to_half(d));
      r.dx[m * r.nbp + b] = dr;
      r.xs[m * r.nbp + b] = dr * static_cast<float>(vaddvq_s32(sum));
    }
  return r;
}

inline int activation_code(const QuantizedRows& r, Format, int64_t m, int64_t k) {
  return static_cast<int8_t>(r.q[m * r.row_q + k]);
}

// acc + products of 16 int8 pairs, in 4 int32 lanes.
inline int32x4_t dot16(int32x4_t acc, int8x16_t a, int8x16_t b) {
#if defined(__ARM_FEATURE_DOTPROD)
  return vdotq_s32(acc, a, b);
#else
  return vpadalq_s16(vpadalq_s16(acc, vmull_s8(vget_low_s8(a), vget_low_s8(b))), vmull_high_s8(a, b));
#endif
}

struct Codes { int8x16_t lo, hi; };  // a block's weight codes: elements 0..15, 16..31

inline Codes load_codes(bool q4, const uint8_t* row, int64_t b) {
  if (q4) {
    const uint8x16_t packed = vld1q_u8(row + b * 16);
    return {vreinterpretq_s8_u8(vandq_u8(packed, vdupq_n_u8(0x0F))), vreinterpretq_s8_u8(vshrq_n_u8(packed, 4))};
  }
  const int8_t* q = reinterpret_cast<const int8_t*>(row + b * kBlock);
  return {vld1q_s8(q), vld1q_s8(q + 16)};
}

inline float32x4_t block_dot(Codes w, const uint8_t* x) {
  const int8_t* xs = reinterpret_cast<const int8_t*>(x);
  return vcvtq_f32_s32(dot16(dot16(vdupq_n_s32(0), w.lo, vld1q_s8(xs)), w.hi, vld1q_s8(xs + 16)));
}

inline float finish_row(float32x4_t acc, float32x4_t acc_odd, const float* mw, const float* sums, int64_t nbp,
                        bool with_mins) {
  float32x4_t mins = vdupq_n_f32(0.f);
  if (with_mins)
    for (int64_t j = 0; j < nbp; j += 4) mins = vfmaq_f32(mins, vld1q_f32(mw + j), vld1q_f32(sums + j));
  return vaddvq_f32(vaddq_f32(vaddq_f32(acc, acc_odd), mins));
}

inline void store4(float* o, float32x4_t v) { vst1q_f32(o, v); }
inline void store4(bf16* o, float32x4_t v) {  // round to nearest even (finite values)
  const uint32x4_t bits = vreinterpretq_u32_f32(v);
  const uint32x4_t odd = vandq_u32(vshrq_n_u32(bits, 16), vdupq_n_u32(1));
  vst1_u16(reinterpret_cast<uint16_t*>(o), vshrn_n_u32(vaddq_u32(bits, vaddq_u32(odd, vdupq_n_u32(0x7FFF))), 16));
}

// Bytes 0..15 of the result are 0xFF where bits 0..15 of `bits` are set.
inline uint8x16_t bit_mask_bytes(uint32_t bits) {
  const uint8x16_t spread = vcombine_u8(vdup_n_u8(static_cast<uint8_t>(bits)), vdup_n_u8(static_cast<uint8_t>(bits >> 8)));
  const uint8x16_t select = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
  return vtstq_u8(spread, select);
}

// The wide formats' block primitives (see wide_matmul_int8).
struct WideBlock {
  using C = Codes;
  using Acc = float32x4_t;
  using FAcc = float32x4_t;
  template <int64_t F> static Codes codes(const uint8_t* row, const uint8_t* qh, int64_t b) {
    const uint8x16_t packed = vld1q_u8(row + b * 16);
    uint8x16_t lo = vandq_u8(packed, vdupq_n_u8(0x0F)), hi = vshrq_n_u8(packed, 4);
    if constexpr (is_iq4(F)) {
      const int8x16_t levels = vld1q_s8(kIq4Levels);
      return {vqtbl1q_s8(levels, lo), vqtbl1q_s8(levels, hi)};
    } else {
      const uint8_t* planes = qh + b * Weight::qh_bytes_of(F);
      if constexpr (F == Q6_K) {
        // Element 8k + i's bits are bits 2k, 2k+1 of byte i: byte i of the 8-byte group k, shifted
        // by 4 - 2k (negative: right), masked to bits 4..5.
        const uint8x8_t bytes = vld1_u8(planes);
        const uint8x16_t both = vcombine_u8(bytes, bytes);
        const int8x16_t shift_lo = {4, 4, 4, 4, 4, 4, 4, 4, 2, 2, 2, 2, 2, 2, 2, 2};
        const int8x16_t shift_hi = {0, 0, 0, 0, 0, 0, 0, 0, -2, -2, -2, -2, -2, -2, -2, -2};
        lo = vorrq_u8(lo, vandq_u8(vshlq_u8(both, shift_lo), vdupq_n_u8(0x30)));
        hi = vorrq_u8(hi, vandq_u8(vshlq_u8(both, shift_hi), vdupq_n_u8(0x30)));
      } else {
        const uint32_t p4 = load_u32(planes);
        lo = vorrq_u8(lo, vandq_u8(bit_mask_bytes(p4), vdupq_n_u8(16)));
        hi = vorrq_u8(hi, vandq_u8(bit_mask_bytes(p4 >> 16), vdupq_n_u8(16)));
      }
      const int8x16_t off = vdupq_n_s8(static_cast<int8_t>(wide_offset(F)));
      return {vsubq_s8(vreinterpretq_s8_u8(lo), off), vsubq_s8(vreinterpretq_s8_u8(hi), off)};
    }
  }
  template <int64_t F> static float32x4_t dot(float32x4_t acc, Codes c, const uint8_t* xq, const float* sd) {
    const int8_t* x = reinterpret_cast<const int8_t*>(xq);
    acc = vfmaq_n_f32(acc, vcvtq_f32_s32(dot16(vdupq_n_s32(0), c.lo, vld1q_s8(x))), sd[0]);
    return vfmaq_n_f32(acc, vcvtq_f32_s32(dot16(vdupq_n_s32(0), c.hi, vld1q_s8(x + 16))), sd[halves(F) - 1]);
  }
  static void widen(Codes c, float32x4_t f[8]) {
    const int8x16_t halves[2] = {c.lo, c.hi};
    for (int h = 0; h < 2; ++h) {
      const int16x8_t lo = vmovl_s8(vget_low_s8(halves[h])), hi = vmovl_high_s8(halves[h]);
      f[4 * h] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo)));
      f[4 * h + 1] = vcvtq_f32_s32(vmovl_high_s16(lo));
      f[4 * h + 2] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi)));
      f[4 * h + 3] = vcvtq_f32_s32(vmovl_high_s16(hi));
    }
  }
  static float32x4_t fdot(float32x4_t acc, Codes c, const float* x, float s_lo, float s_hi) {
    float32x4_t f[8];
    widen(c, f);
    for (int h = 0; h < 2; ++h) {
      float32x4_t d = vmulq_f32(f[4 * h], vld1q_f32(x + 16 * h));
      for (int i = 1; i < 4; ++i) d = vfmaq_f32(d, f[4 * h + i], vld1q_f32(x + 16 * h + 4 * i));
      acc = vfmaq_n_f32(acc, d, h ? s_hi : s_lo);
    }
    return acc;
  }
  template <typename T> static void store(T* out, Codes c, float s_lo, float s_hi, float mn) {
    float32x4_t f[8];
    widen(c, f);
    for (int i = 0; i < 8; ++i) store4(out + 4 * i, vfmaq_n_f32(vdupq_n_f32(mn), f[i], i < 4 ? s_lo : s_hi));
  }
  static float sum(float32x4_t a, float32x4_t b) { return vaddvq_f32(vaddq_f32(a, b)); }
};

inline void matmul_int8_rows(const Weight& w, const QuantizedRows& xr, float* y, int64_t n_begin, int64_t n_end) {
  if (w.wide()) return with_wide_format<WideInt8, WideBlock>(w.fmt, w, xr, y, n_begin, n_end);
  const int64_t nb = w.nb, N = w.N, M = xr.M, nbp = xr.nbp, row_q = xr.row_q;
  const int64_t block_bytes = w.q4() ? 16 : kBlock, paired = nb / 2 * 2;
  std::vector<float> sw(nbp), mw(nbp);
  std::vector<float32x4_t> acc(M), acc_odd(M);
  for (int64_t n = n_begin; n < n_end; ++n) {
    row_scales(w, n, sw.data(), mw.data());
    const uint8_t* row = w.qs + n * w.row_bytes();
    if (M == 1) {
      // Decoding: two blocks per step into two accumulators; an odd last block into the first.
      const uint8_t* xq = xr.q.data();
      const float* dx = xr.dx.data();
      float32x4_t acc0 = vdupq_n_f32(0.f), acc1 = vdupq_n_f32(0.f);
      int64_t b = 0;
      for (; b < paired; b += 2) {
        __builtin_prefetch(row + b * block_bytes + kPrefetchAhead, 0, 2);
        acc0 = vfmaq_n_f32(acc0, block_dot(load_codes(w.q4(), row, b), xq + b * kBlock), sw[b] * dx[b]);
        acc1 = vfmaq_n_f32(acc1, block_dot(load_codes(w.q4(), row, b + 1), xq + (b + 1) * kBlock), sw[b + 1] * dx[b + 1]);
      }
      if (b < nb) acc0 = vfmaq_n_f32(acc0, block_dot(load_codes(w.q4(), row, b), xq + b * kBlock), sw[b] * dx[b]);
      acc[0] = acc0;
      acc_odd[0] = acc1;
    } else {
      for (int64_t m = 0; m < M; ++m) acc[m] = acc_odd[m] = vdupq_n_f32(0.f);
      for (int64_t b = 0; b < nb; ++b) {
        const Codes codes = load_codes(w.q4(), row, b);
        std::vector<float32x4_t>& into = (b < paired && (b & 1)) ? acc_odd : acc;
        for (int64_t m = 0; m < M; ++m)
          into[m] = vfmaq_n_f32(into[m], block_dot(codes, xr.q.data() + m * row_q + b * kBlock), sw[b] * xr.dx[m * nbp + b]);
      }
    }
    for (int64_t m = 0; m < M; ++m)
      y[m * N + n] = finish_row(acc[m], acc_odd[m], mw.data(), xr.xs.data() + m * nbp, nbp, w.fmt != Q8_0);
  }
}

inline FloatRows prepare_float_rows(const float* x, int64_t M, int64_t K) {
  const int64_t nb = K / kBlock, nbp = round_up(nb, 4);
  FloatRows r{x, M, K, nbp, std::vector<float>(M * nbp, 0.f)};
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + m * K + b * kBlock;
      float32x4_t s = vld1q_f32(xb);
      for (int i = 1; i < 8; ++i) s = vaddq_f32(s, vld1q_f32(xb + 4 * i));
      r.sums[m * nbp + b] = vaddvq_f32(s);
    }
  return r;
}

// Block b of a row widened to float: elements 4i..4i+3 in f[i] (codes, before scale).
inline void widen_block(bool q4, const uint8_t* row, int64_t b, float32x4_t f[8]) {
  WideBlock::widen(load_codes(q4, row, b), f);
}

inline float32x4_t block_dot(const float32x4_t f[8], const float* xb) {
  float32x4_t dot = vmulq_f32(f[0], vld1q_f32(xb));
  for (int i = 1; i < 8; ++i) dot = vfmaq_f32(dot, f[i], vld1q_f32(xb + 4 * i));
  return dot;
}

inline void matmul_float_rows(const Weight& w, const FloatRows& xr, float* y, int64_t n_begin, int64_t n_end) {
  if (w.wide()) return with_wide_format<WideFloat, WideBlock>(w.fmt, w, xr, y, n_begin, n_end);
  const int64_t K = w.K, nb = w.nb, N = w.N, M = xr.M, nbp = xr.nbp;
  std::vector<float> sw(nbp), mw(nbp);
  std::vector<float32x4_t> acc(M), acc_odd(M);
  for (int64_t n = n_begin; n < n_end; ++n) {
    row_scales(w, n, sw.data(), mw.data());
    const uint8_t* row = w.qs + n * w.row_bytes();
    float32x4_t f[8];
    if (M == 1) {
      float32x4_t acc0 = vdupq_n_f32(0.f), acc1 = vdupq_n_f32(0.f);
      for (int64_t b = 0; b < nb; ++b) {
        widen_block(w.q4(), row, b, f);
        const float32x4_t dot = block_dot(f, xr.x + b * kBlock);
        if (b & 1) acc1 = vfmaq_n_f32(acc1, dot, sw[b]);
        else acc0 = vfmaq_n_f32(acc0, dot, sw[b]);
      }
      acc[0] = acc0;
      acc_odd[0] = acc1;
    } else {
      for (int64_t m = 0; m < M; ++m) acc[m] = acc_odd[m] = vdupq_n_f32(0.f);
      for (int64_t b = 0; b < nb; ++b) {
        widen_block(w.q4(), row, b, f);
        std::vector<float32x4_t>& into = (b & 1) ? acc_odd : acc;
        for (int64_t m = 0; m < M; ++m) into[m] = vfmaq_n_f32(into[m], block_dot(f, xr.x + m * K + b * kBlock), sw[b]);
      }
    }
    for (int64_t m = 0; m < M; ++m)
      y[m * N + n] = finish_row(acc[m], acc_odd[m], mw.data(), xr.sums.data() + m * nbp, nbp, true);
  }
}

template <typename T>
void dequantize_rows(const Weight& w, T* out, int64_t n_begin, int64_t n_end) {
  if (w.wide()) return with_wide_format<WideDequantize, WideBlock>(w.fmt, w, out, n_begin, n_end);
  const int64_t nbp = round_up(w.nb, 4);
  std::vector<float> sw(nbp), mw(nbp);
  for (int64_t n = n_begin; n < n_end; ++n) {
    row_scales(w, n, sw.data(), mw.data());
    const uint8_t* row = w.qs + n * w.row_bytes();
    for (int64_t b = 0; b < w.nb; ++b) {
      float32x4_t f[8];
      widen_block(w.q4(), row, b, f);
      for (int i = 0; i < 8; ++i) store4(out + n * w.K + b * kBlock + 4 * i, vfmaq_n_f32(vdupq_n_f32(mw[b]), f[i], sw[b]));
    }
  }
}

inline float32x4_t load4(const float* p) { return vld1q_f32(p); }
inline float32x4_t load4(const bf16* p) {  // bfloat16 is the top half of a float32
  return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(reinterpret_cast<const uint16_t*>(p)), 16));
}
inline float32x4_t load4(const half* p) {
  return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(reinterpret_cast<const uint16_t*>(p))));
}

template <typename T, typename C>
void attend_head(const T* q, const C* kb, const C* vb, const bool* allowed, T* out, int64_t S, int64_t hd,
                 float scale, float* p) {
  const int64_t chunks = hd / 4;
  float32x4_t qv[32], acc[32];
  for (int64_t c = 0; c < chunks; ++c) qv[c] = vmulq_n_f32(load4(q + c * 4), scale);
  float mx = -INFINITY;
  for (int64_t s = 0; s < S; ++s) {
    if (allowed && !allowed[s]) { p[s] = -INFINITY; continue; }
    const C* ks = kb + s * hd;
    float32x4_t dot = vmulq_f32(qv[0], load4(ks));
    for (int64_t c = 1; c < chunks; ++c) dot = vfmaq_f32(dot, qv[c], load4(ks + c * 4));
    p[s] = vaddvq_f32(dot);
    mx = std::max(mx, p[s]);
  }
  float total = 0.f;
  for (int64_t s = 0; s < S; ++s) { p[s] = std::exp(p[s] - mx); total += p[s]; }
  for (int64_t c = 0; c < chunks; ++c) acc[c] = vdupq_n_f32(0.f);
  for (int64_t s = 0; s < S; ++s) {
    if (p[s] == 0.f) continue;
    const C* vs = vb + s * hd;
    for (int64_t c = 0; c < chunks; ++c) acc[c] = vfmaq_n_f32(acc[c], load4(vs + c * 4), p[s]);
  }
  float tmp[4];
  for (int64_t c = 0; c < chunks; ++c) {
    vst1q_f32(tmp, vmulq_n_f32(acc[c], 1.f / total));
    for (int64_t d = 0; d < 4; ++d) out[c * 4 + d] = from_float<T>(tmp[d]);
  }
}

// Decoding: the same kernel (this build has one int8 kernel for any number of rows).
inline void matmul_int8_decode(const Weight& w, const QuantizedRows& xr, float* y, int64_t n_begin, int64_t n_end) {
  matmul_int8_rows(w, xr, y, n_begin, n_end);
}

}  // namespace neon
#endif  // PHI3_NEON

#if defined(PHI3_AVX512)
namespace isa = avx512;
constexpr const char* kIsa = "avx512";
#elif defined(PHI3_AVX2) && defined(__AVXVNNI__)
namespace isa = avx2;
constexpr const char* kIsa = "avx2 avxvnni";
#elif defined(PHI3_AVX2)
namespace isa = avx2;
constexpr const char* kIsa = "avx2";
#elif defined(PHI3_NEON) && defined(__ARM_FEATURE_DOTPROD)
namespace isa = neon;
constexpr const char* kIsa = "neon dotprod";
#elif defined(PHI3_NEON)
namespace isa = neon;
constexpr const char* kIsa = "neon";
#else
namespace isa = ref;
constexpr const char* kIsa = "portable";
#endif

}  // namespace phi3
