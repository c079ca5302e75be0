// Matrix products with weights kept in llama.cpp's 4- and 8-bit block formats, for CPU decoding.
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
// Two ways to multiply:
//   int8 activations (the default, llama.cpp's method): x is rounded to int8 per block of 32 with
//     a half-precision scale, and 64 nibble-by-int8 products go into one AVX-512 VNNI
//     instruction (vpdpbusd). Memory-bound at one row.
//   float activations (exact): nibbles are widened to float and multiplied with float x, giving
//     the dequantized reference's numbers up to summation order. ~3x slower.
// Products are accumulated in float32: y[m, n] = sum_b scale_b * (sum_j q_j x_j) + min_b * sum_j x_j.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;
enum Format : int64_t { Q4_0 = 0, Q4_1 = 1, Q4_K = 2, Q8_0 = 3 };

inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }
inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

struct Weight {
  int64_t fmt, N, K, nb;
  const uint8_t* qs;
  const uint16_t* d;    // half, q4_0/q4_1/q8_0
  const uint16_t* m;    // half, q4_1
  const uint8_t* sc;    // q4_k sub-block scales
  const uint8_t* mn;    // q4_k sub-block mins
  const uint16_t* dm;   // q4_k (d, dmin) per super-block
  bool q4() const { return fmt != Q8_0; }
  int64_t row_bytes() const { return q4() ? K / 2 : K; }
};

Weight make_weight(int64_t fmt, const torch::Tensor& qs, const torch::Tensor& a, const torch::Tensor& b,
                   const torch::Tensor& c) {
  TORCH_CHECK(fmt >= Q4_0 && fmt <= Q8_0, "unknown block format ", fmt);
  TORCH_CHECK(qs.dim() == 2 && qs.is_contiguous() && a.is_contiguous() && b.is_contiguous() && c.is_contiguous(),
              "block weight tensors must be contiguous");
  Weight w{};
  w.fmt = fmt;
  w.N = qs.size(0);
  w.K = fmt == Q8_0 ? qs.size(1) : qs.size(1) * 2;
  w.nb = w.K / kBlock;
  TORCH_CHECK(w.K % kBlock == 0, "K must be a multiple of 32");
  TORCH_CHECK(a.numel() == w.N * w.nb, "block scales: expected ", w.N * w.nb, " values, got ", a.numel());
  w.qs = static_cast<const uint8_t*>(qs.data_ptr());
  if (fmt == Q4_K) {
    TORCH_CHECK(w.nb % 8 == 0 && b.numel() == w.N * w.nb && c.numel() == w.N * w.nb / 4, "q4_k: scale shapes");
    w.sc = a.data_ptr<uint8_t>();
    w.mn = b.data_ptr<uint8_t>();
    w.dm = reinterpret_cast<const uint16_t*>(c.data_ptr<at::Half>());
  } else {
    w.d = reinterpret_cast<const uint16_t*>(a.data_ptr<at::Half>());
    if (fmt == Q4_1) {
      TORCH_CHECK(b.numel() == w.N * w.nb, "q4_1: mins shape");
      w.m = reinterpret_cast<const uint16_t*>(b.data_ptr<at::Half>());
    }
  }
  return w;
}

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
void row_scales(const Weight& w, int64_t n, float* sw, float* mw) {
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

// Activations rounded to int8 per block of 32, as llama.cpp's quantize_row_q8_0 does: scale
// amax/127 (stored as half), values round(x / scale).
struct QuantizedRows {
  int64_t M, nb, nbp;
  std::vector<uint8_t> q;      // per row: round_up(nb, 4) * 32 bytes in the weight format's order
  std::vector<float> dx;       // per row: nbp block scales (zero-padded)
  std::vector<float> xs;       // per row: nbp block sums, dx * sum(q)
};

QuantizedRows quantize_rows(const float* x, int64_t M, int64_t K, bool q4_order) {
  QuantizedRows r;
  r.M = M; r.nb = K / kBlock; r.nbp = round_up(r.nb, 16);
  const int64_t row_q = round_up(r.nb, 4) * kBlock;
  r.q.assign(M * row_q, q4_order ? 0 : 0x80);
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
      uint8_t* out = r.q.data() + m * row_q;
      if (q4_order) {
        // Group of 4 blocks = 128 bytes: elements 0..15 of the 4 blocks, then elements 16..31.
        const int64_t g = b / 4, i = b % 4;
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + g * 128 + i * 16), _mm512_cvtepi32_epi8(qlo));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + g * 128 + 64 + i * 16), _mm512_cvtepi32_epi8(qhi));
      } else {
        // Offset by 128 to unsigned, for vpdpbusd's unsigned operand (corrected with the weight sums).
        const __m512i off = _mm512_set1_epi32(128);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + b * 32), _mm512_cvtepi32_epi8(_mm512_add_epi32(qlo, off)));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + b * 32 + 16), _mm512_cvtepi32_epi8(_mm512_add_epi32(qhi, off)));
      }
    }
  }
  return r;
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

// Rows per task: each thread streams a long contiguous stretch of weights.
constexpr int64_t kGrain = 32;
// Decoding prefetches the weight stream this far ahead: the hardware prefetcher alone leaves
// long rows behind (phi-3-medium's down projection, K = 17920, streamed at 28-30 GB/s on 2 threads
// without it and 34-39 with it; rows of K <= 8192 are unchanged; 2 KB ahead was too short).
// Into L2, not L1: weights are read once, and fetched into L1 8 KB early they evict the
// activations and scales that each row rereads (whole-model phi-3-mini decode 14.4 -> 15.8 tok/s,
// the medium down projection 21 -> 33 GB/s, other shapes unchanged; measured A/B, 2026-12-01).
constexpr int64_t kPrefetchAhead = 8192;

void matmul_int8(const Weight& w, const float* x, int64_t M, float* y) {
  const int64_t K = w.K, nb = w.nb, N = w.N, nbp = round_up(nb, 16);
  const QuantizedRows xr = quantize_rows(x, M, K, w.q4());
  const int64_t row_q = round_up(nb, 4) * kBlock;
  const __m512i low = _mm512_set1_epi8(0x0F);
  const __m512i ones = _mm512_set1_epi8(1);
  at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> sw(nbp + 4), mw(nbp + 4), sd(nbp + 4);
    std::vector<__m512> acc(M), acc_odd(M);
    for (int64_t n = begin; n < end; ++n) {
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
        // accumulator), so that a row's result never depends on how many rows share the call:
        // a server batching requests gives each the numbers it would get alone.
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
  });
}

// Exact path: nibbles widened to float against float x.
void matmul_float(const Weight& w, const float* x, int64_t M, float* y) {
  const int64_t K = w.K, nb = w.nb, N = w.N, nbp = round_up(nb, 16);
  std::vector<float> xsum(M * nbp, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + m * K + b * kBlock;
      xsum[m * nbp + b] = hsum(_mm512_add_ps(_mm512_loadu_ps(xb), _mm512_loadu_ps(xb + 16)));
    }
  at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> sw(nbp), mw(nbp);
    std::vector<__m512> acc(M), acc_odd(M);
    for (int64_t n = begin; n < end; ++n) {
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
        // The one-row path's summation order (see matmul_int8).
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
          mins = _mm512_fmadd_ps(_mm512_loadu_ps(mw.data() + j), _mm512_loadu_ps(xsum.data() + m * nbp + j), mins);
        y[m * N + n] = hsum(_mm512_add_ps(acc[m], mins));
      }
    }
  });
}

}  // namespace

// x [..., K] (any float dtype) @ W^T -> [..., N] in x's dtype, products in float32.
torch::Tensor block_matmul(torch::Tensor x, int64_t fmt, torch::Tensor qs, torch::Tensor a, torch::Tensor b,
                           torch::Tensor c, bool int8_activations) {
  const Weight w = make_weight(fmt, qs, a, b, c);
  auto shape = x.sizes().vec();
  TORCH_CHECK(shape.back() == w.K, "K mismatch: x has ", shape.back(), ", weight ", w.K);
  auto xf = x.reshape({-1, w.K}).to(torch::kFloat).contiguous();
  const int64_t M = xf.size(0);
  auto y = torch::empty({M, w.N}, xf.options());
  if (int8_activations) matmul_int8(w, xf.data_ptr<float>(), M, y.data_ptr<float>());
  else matmul_float(w, xf.data_ptr<float>(), M, y.data_ptr<float>());
  shape.back() = w.N;
  return y.to(x.scalar_type()).view(shape);
}

// Dense [N, K] weights (float32 or bfloat16) from blocks: for prompts, where a dense matmul
// reuses each weight across many rows better than the row-at-a-time kernels above.
torch::Tensor block_dequantize(int64_t fmt, torch::Tensor qs, torch::Tensor a, torch::Tensor b, torch::Tensor c,
                               c10::ScalarType dtype) {
  const Weight w = make_weight(fmt, qs, a, b, c);
  TORCH_CHECK(dtype == torch::kFloat || dtype == torch::kBFloat16, "dequantize: float32 or bfloat16");
  auto out = torch::empty({w.N, w.K}, qs.options().dtype(dtype));
  const int64_t K = w.K, nb = w.nb, nbp = round_up(nb, 16);
  at::parallel_for(0, w.N, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> sw(nbp), mw(nbp);
    for (int64_t n = begin; n < end; ++n) {
      row_scales(w, n, sw.data(), mw.data());
      const uint8_t* row = w.qs + n * w.row_bytes();
      for (int64_t blk = 0; blk < nb; ++blk) {
        const __m512 s = _mm512_set1_ps(sw[blk]), mn = _mm512_set1_ps(mw[blk]);  // q8_0: min 0
        __m512 lo, hi;
        widen_block(w.q4(), row, blk, lo, hi);
        lo = _mm512_fmadd_ps(lo, s, mn);
        hi = _mm512_fmadd_ps(hi, s, mn);
        if (dtype == torch::kFloat) {
          float* o = out.data_ptr<float>() + n * K + blk * kBlock;
          _mm512_storeu_ps(o, lo);
          _mm512_storeu_ps(o + 16, hi);
        } else {
          at::BFloat16* o = out.data_ptr<at::BFloat16>() + n * K + blk * kBlock;
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), to_bf16(lo));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 16), to_bf16(hi));
        }
      }
    }
  });
  return out;
}

// --- Decoding helpers: small ops that PyTorch's CPU kernels make expensive at batch 1 ---------
// (bfloat16 SDPA costs ~60 us and bfloat16 rms_norm ~19 us per call on our test CPU; these take a
// few microseconds, computing in float32 whatever the storage type.)

template <typename T>
inline float as_float(T v) { return static_cast<float>(v); }

template <typename T>
void rms_norm_impl(const T* x, const T* w, T* y, int64_t rows, int64_t D, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * D;
      double ss = 0.0;  // double: the reference's vectorised float sum is closer to exact than a serial one
      for (int64_t i = 0; i < D; ++i) { double v = as_float(xr[i]); ss += v * v; }
      const float inv = 1.f / std::sqrt(static_cast<float>(ss / D) + eps);
      T* yr = y + r * D;
      for (int64_t i = 0; i < D; ++i) yr[i] = static_cast<T>(as_float(xr[i]) * inv * as_float(w[i]));
    }
  });
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "rms_norm: x and weight dtypes differ");
  auto xc = x.contiguous();
  auto y = torch::empty_like(xc);
  const int64_t D = x.size(-1), rows = x.numel() / D;
  if (x.scalar_type() == torch::kFloat) {
    rms_norm_impl(xc.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), rows, D, (float)eps);
  } else {
    TORCH_CHECK(x.scalar_type() == torch::kBFloat16, "rms_norm: float32 or bfloat16");
    rms_norm_impl(xc.data_ptr<at::BFloat16>(), w.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>(), rows, D, (float)eps);
  }
  return y;
}

// One query per row against a layer's cache: q [B, H, hd]; k, v [B, KV, Smax, hd] (the first S
// slots hold keys); allowed [B, S] bool or empty (all allowed). Returns [B, H, hd] in q's dtype.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {  // bfloat16 is the top half of a float32
  __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// One head of one query against its cache stretch: kb, vb point at slot 0 of the head's keys and
// values (C: the activations' type T, or half for a 16-bit cache under float32 activations);
// `allowed` is the row's [S] mask or null. p is scratch of S floats.
template <typename T, typename C>
inline void attend_head(const T* q, const C* kb, const C* vb, const bool* allowed, T* out,
                        int64_t S, int64_t hd, float scale, float* p) {
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
    for (int64_t d = 0; d < 16; ++d) out[c * 16 + d] = static_cast<T>(tmp[d]);
  }
}

template <typename T, typename C>
void attend_impl(const T* q, const C* k, const C* v, const bool* allowed, T* out,
                 int64_t B, int64_t H, int64_t KV, int64_t Smax, int64_t S, int64_t hd, float scale) {
  const int64_t rep = H / KV;
  // Short caches are cheaper on one thread than waking the other.
  const int64_t grain = S * H * hd < (1 << 18) ? B * H : 1;
  at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> p(S);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, h = i % H, g = h / rep;
      attend_head(q + i * hd, k + (b * KV + g) * Smax * hd, v + (b * KV + g) * Smax * hd,
                  allowed ? allowed + b * S : nullptr, out + i * hd, S, hd, scale, p.data());
    }
  });
}

torch::Tensor attend_one(torch::Tensor q, torch::Tensor k, torch::Tensor v, int64_t S, torch::Tensor allowed,
                         double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && k.is_contiguous() && v.is_contiguous(), "attend_one: shapes");
  TORCH_CHECK((q.scalar_type() == k.scalar_type() || k.scalar_type() == torch::kHalf) &&
              k.scalar_type() == v.scalar_type(), "attend_one: cache dtype must be q's or float16");
  const bool half_cache = k.scalar_type() == torch::kHalf;
  auto qc = q.contiguous();
  const int64_t B = q.size(0), H = q.size(1), hd = q.size(2), KV = k.size(1), Smax = k.size(2);
  TORCH_CHECK(S <= Smax && H % KV == 0 && k.size(3) == hd, "attend_one: cache shape");
  TORCH_CHECK(hd % 16 == 0 && hd <= 128, "attend_one: head_dim must be a multiple of 16, at most 128");
  auto out = torch::empty_like(qc);
  torch::Tensor allowed_c;
  const bool* ap = nullptr;
  if (allowed.numel()) {
    allowed_c = allowed.to(torch::kBool).contiguous();
    TORCH_CHECK(allowed_c.numel() == B * S, "attend_one: allowed must be [B, S]");
    ap = allowed_c.data_ptr<bool>();
  }
  auto run = [&](auto activation) {  // the activations' type T; the cache's is T or half
    using T = decltype(activation);
    if (half_cache)
      attend_impl(qc.data_ptr<T>(), k.data_ptr<at::Half>(), v.data_ptr<at::Half>(), ap, out.data_ptr<T>(),
                  B, H, KV, Smax, S, hd, (float)scale);
    else
      attend_impl(qc.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), ap, out.data_ptr<T>(), B, H, KV, Smax, S, hd,
                  (float)scale);
  };
  if (q.scalar_type() == torch::kFloat) {
    run(float{});
  } else {
    TORCH_CHECK(q.scalar_type() == torch::kBFloat16, "attend_one: float32 or bfloat16");
    run(at::BFloat16{});
  }
  return out;
}

// A whole attention block for one new token per row, after the qkv projection: rotate q and k
// (rotate-half convention, cos/sin already scaled), write k and v into the cache at slot `start`,
// attend over slots [0, start]. qkv [B, (H + 2 KV) hd]; cos, sin [B, hd]; caches [B, KV, Smax, hd].
template <typename T>
void rotate_into(const T* x, const T* cos, const T* sin, int64_t hd, T* out) {
  const int64_t half = hd / 2;
  for (int64_t d = 0; d < half; ++d) {
    // Round each product as the reference's separate multiplies do.
    T a = static_cast<T>(as_float(x[d]) * as_float(cos[d]));
    T b = static_cast<T>(-as_float(x[d + half]) * as_float(sin[d]));
    out[d] = static_cast<T>(as_float(a) + as_float(b));
    T c = static_cast<T>(as_float(x[d + half]) * as_float(cos[d + half]));
    T e = static_cast<T>(as_float(x[d]) * as_float(sin[d + half]));
    out[d + half] = static_cast<T>(as_float(c) + as_float(e));
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
    for (int64_t d = 0; d < hd; ++d) slot[d] = static_cast<C>(as_float(src[d]));
  }
}

template <typename T, typename C>
torch::Tensor decode_attention_impl(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor kc,
                                    torch::Tensor vc, int64_t start, torch::Tensor allowed, double scale,
                                    int64_t H) {
  const int64_t B = qkv.size(0), KV = kc.size(1), Smax = kc.size(2), hd = kc.size(3);
  auto q = torch::empty({B, H, hd}, qkv.options());
  const T* src = qkv.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  T* qp = q.data_ptr<T>();
  C* kp = kc.data_ptr<C>();
  C* vp = vc.data_ptr<C>();
  const int64_t width = (H + 2 * KV) * hd;
  for (int64_t b = 0; b < B; ++b) {
    const T* row = src + b * width;
    for (int64_t h = 0; h < H; ++h) rotate_into(row + h * hd, cp + b * hd, sp + b * hd, hd, qp + (b * H + h) * hd);
    for (int64_t g = 0; g < KV; ++g) {
      write_slot(row + (H + g) * hd, cp + b * hd, sp + b * hd, hd, true, kp + ((b * KV + g) * Smax + start) * hd);
      write_slot(row + (H + KV + g) * hd, cp, sp, hd, false, vp + ((b * KV + g) * Smax + start) * hd);
    }
  }
  return attend_one(q, kc, vc, start + 1, allowed, scale);
}

torch::Tensor decode_attention(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor kc,
                               torch::Tensor vc, int64_t start, torch::Tensor allowed, double scale, int64_t H) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous() && cos.is_contiguous() && sin.is_contiguous(),
              "decode_attention: contiguous qkv [B, width], cos/sin [B, hd]");
  TORCH_CHECK(kc.is_contiguous() && vc.is_contiguous() && start < kc.size(2), "decode_attention: cache");
  TORCH_CHECK(qkv.size(1) == (H + 2 * kc.size(1)) * kc.size(3), "decode_attention: qkv width");
  TORCH_CHECK(kc.size(3) % 16 == 0 && kc.size(3) <= 128, "decode_attention: head_dim must be a multiple of 16, at most 128");
  TORCH_CHECK((qkv.scalar_type() == kc.scalar_type() || kc.scalar_type() == torch::kHalf) &&
              vc.scalar_type() == kc.scalar_type() && cos.scalar_type() == qkv.scalar_type(),
              "decode_attention: cache dtype must be qkv's or float16");
  const bool half_cache = kc.scalar_type() == torch::kHalf;
  if (qkv.scalar_type() == torch::kFloat)
    return half_cache ? decode_attention_impl<float, at::Half>(qkv, cos, sin, kc, vc, start, allowed, scale, H)
                      : decode_attention_impl<float, float>(qkv, cos, sin, kc, vc, start, allowed, scale, H);
  TORCH_CHECK(qkv.scalar_type() == torch::kBFloat16, "decode_attention: float32 or bfloat16");
  using BF = at::BFloat16;
  return half_cache ? decode_attention_impl<BF, at::Half>(qkv, cos, sin, kc, vc, start, allowed, scale, H)
                    : decode_attention_impl<BF, BF>(qkv, cos, sin, kc, vc, start, allowed, scale, H);
}

// decode_attention for M independent sequences, each with its own cache (a server's requests):
// qkv [M, width], cos/sin [M, hd]; caches[i] = [L, 1, KV, Smax_i, hd] (k and v), `layer` picks the
// layer; starts[i] the slot of row i's new token; allowed[i] empty or [1, starts[i] + 1]. Every
// row's numbers are those decode_attention gives it alone (same per-head code).
template <typename T, typename C>
torch::Tensor decode_attention_many_impl(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin,
                                         const std::vector<torch::Tensor>& ks, const std::vector<torch::Tensor>& vs,
                                         int64_t layer, const std::vector<int64_t>& starts,
                                         const std::vector<torch::Tensor>& allowed, double scale, int64_t H) {
  const int64_t M = qkv.size(0), KV = ks[0].size(2), hd = ks[0].size(4), rep = H / KV;
  const int64_t width = (H + 2 * KV) * hd;
  auto q = torch::empty({M, H, hd}, qkv.options());
  auto out = torch::empty({M, H * hd}, qkv.options());
  const T* src = qkv.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  T* qp = q.data_ptr<T>();
  std::vector<C*> kbase(M), vbase(M);
  std::vector<const bool*> ap(M);
  std::vector<int64_t> smax(M);
  int64_t longest = 0, work = 0;
  for (int64_t b = 0; b < M; ++b) {
    smax[b] = ks[b].size(3);
    TORCH_CHECK(starts[b] < smax[b], "decode_attention_many: cache full");
    kbase[b] = ks[b].data_ptr<C>() + layer * KV * smax[b] * hd;
    vbase[b] = vs[b].data_ptr<C>() + layer * KV * smax[b] * hd;
    ap[b] = allowed[b].numel() ? allowed[b].data_ptr<bool>() : nullptr;
    longest = std::max(longest, starts[b] + 1);
    work += (starts[b] + 1) * H * hd;
    const T* row = src + b * width;
    for (int64_t h = 0; h < H; ++h) rotate_into(row + h * hd, cp + b * hd, sp + b * hd, hd, qp + (b * H + h) * hd);
    for (int64_t g = 0; g < KV; ++g) {
      write_slot(row + (H + g) * hd, cp + b * hd, sp + b * hd, hd, true, kbase[b] + (g * smax[b] + starts[b]) * hd);
      write_slot(row + (H + KV + g) * hd, cp, sp, hd, false, vbase[b] + (g * smax[b] + starts[b]) * hd);
    }
  }
  T* op = out.data_ptr<T>();
  const int64_t grain = work < (1 << 18) ? M * H : 1;
  at::parallel_for(0, M * H, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> p(longest);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, h = i % H, g = h / rep;
      attend_head(qp + i * hd, kbase[b] + g * smax[b] * hd, vbase[b] + g * smax[b] * hd, ap[b], op + i * hd,
                  starts[b] + 1, hd, (float)scale, p.data());
    }
  });
  return out;
}

torch::Tensor decode_attention_many(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin,
                                    std::vector<torch::Tensor> ks, std::vector<torch::Tensor> vs, int64_t layer,
                                    std::vector<int64_t> starts, std::vector<torch::Tensor> allowed, double scale,
                                    int64_t H) {
  const int64_t M = qkv.size(0);
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous() && cos.is_contiguous() && sin.is_contiguous(),
              "decode_attention_many: contiguous qkv [M, width], cos/sin [M, hd]");
  TORCH_CHECK((int64_t)ks.size() == M && (int64_t)vs.size() == M && (int64_t)starts.size() == M &&
              (int64_t)allowed.size() == M, "decode_attention_many: one cache, start and mask per row");
  for (int64_t b = 0; b < M; ++b) {
    TORCH_CHECK(ks[b].dim() == 5 && ks[b].is_contiguous() && vs[b].is_contiguous() && ks[b].size(1) == 1 &&
                ks[b].scalar_type() == ks[0].scalar_type() && vs[b].scalar_type() == ks[0].scalar_type() &&
                vs[b].sizes() == ks[b].sizes(),
                "decode_attention_many: caches [L, 1, KV, Smax, hd], all of one dtype");
    TORCH_CHECK(ks[b].size(2) == ks[0].size(2) && ks[b].size(4) == ks[0].size(4) && layer < ks[b].size(0),
                "decode_attention_many: cache shapes");
    TORCH_CHECK(!allowed[b].numel() || (allowed[b].scalar_type() == torch::kBool && allowed[b].is_contiguous() &&
                                        allowed[b].numel() == starts[b] + 1), "decode_attention_many: mask");
  }
  TORCH_CHECK(qkv.size(1) == (H + 2 * ks[0].size(2)) * ks[0].size(4), "decode_attention_many: qkv width");
  TORCH_CHECK(ks[0].size(4) % 16 == 0 && ks[0].size(4) <= 128,
              "decode_attention_many: head_dim must be a multiple of 16, at most 128");
  TORCH_CHECK(ks[0].scalar_type() == qkv.scalar_type() || ks[0].scalar_type() == torch::kHalf,
              "decode_attention_many: cache dtype must be qkv's or float16");
  const bool half_cache = ks[0].scalar_type() == torch::kHalf;
  if (qkv.scalar_type() == torch::kFloat)
    return half_cache
        ? decode_attention_many_impl<float, at::Half>(qkv, cos, sin, ks, vs, layer, starts, allowed, scale, H)
        : decode_attention_many_impl<float, float>(qkv, cos, sin, ks, vs, layer, starts, allowed, scale, H);
  TORCH_CHECK(qkv.scalar_type() == torch::kBFloat16, "decode_attention_many: float32 or bfloat16");
  using BF = at::BFloat16;
  return half_cache ? decode_attention_many_impl<BF, at::Half>(qkv, cos, sin, ks, vs, layer, starts, allowed, scale, H)
                    : decode_attention_many_impl<BF, BF>(qkv, cos, sin, ks, vs, layer, starts, allowed, scale, H);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("block_matmul", &block_matmul, "x [..., K] @ block weight [N, K]^T -> [..., N]");
  m.def("block_dequantize", &block_dequantize, "blocks -> dense [N, K]");
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dim, float32 math");
  m.def("attend_one", &attend_one, "attention of one query per row against a cache");
  m.def("decode_attention", &decode_attention, "rotary + cache write + attention for one new token per row");
  m.def("decode_attention_many", &decode_attention_many, "decode_attention for rows with caches of their own");
}
