// Matrix products with weights kept in llama.cpp's block formats, for CPU decoding.
//
// Why our own kernel: PyTorch's int4 CPU kernel (_weight_int4pack_mm_for_cpu) only runs fast
// with bfloat16 activations and rounds the block scales to bfloat16; with float32 activations it
// is ~30x slower than a dense matmul. Decoding reads every weight once per token, so the bytes per
// weight set the speed: 4-bit blocks read 7x less than float32.
//
// Layout (repacked from GGUF at load): for an [N, K] weight in blocks of 32 along K,
//   q4: qs [N, K/2] uint8 (block b of a row: bytes 16b..16b+15; low nibble = element j,
//       high nibble = element j+16), scale [N, K/32] float, min [N, K/32] float:
//       w = scale * q + min  (Q4_0 folds its -8 into min = -8 * scale)
//   q8: qs [N, K] int8, scale [N, K/32] float: w = scale * q
// Products are accumulated in float32: y[m, n] = sum_b scale * (sum_j q_j x_j) + min * sum_j x_j.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;

inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

void check(const torch::Tensor& x, const torch::Tensor& qs, const torch::Tensor& scale, int64_t k_per_byte) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: contiguous float32 [M, K]");
  TORCH_CHECK(qs.dim() == 2 && qs.is_contiguous(), "qs: contiguous [N, K/", k_per_byte, "]");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat && scale.is_contiguous(), "scale: contiguous float32");
  TORCH_CHECK(x.size(1) == qs.size(1) * k_per_byte, "K mismatch: x has ", x.size(1), ", weight ", qs.size(1) * k_per_byte);
  TORCH_CHECK(x.size(1) % kBlock == 0, "K must be a multiple of 32");
}

// Grain: rows per task, so that each thread streams a long contiguous stretch of weights.
constexpr int64_t kGrain = 64;

}  // namespace

torch::Tensor q4_matmul_f32(torch::Tensor x, torch::Tensor qs, torch::Tensor scale, torch::Tensor min) {
  check(x, qs, scale, 2);
  const int64_t M = x.size(0), K = x.size(1), N = qs.size(0), nb = K / kBlock;
  auto y = torch::empty({M, N}, x.options());
  // Sum of each block of x, for the min term.
  auto xsum = x.view({M, nb, kBlock}).sum(-1).contiguous();
  const float* xp = x.data_ptr<float>();
  const float* xs = xsum.data_ptr<float>();
  const uint8_t* qp = qs.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* mp = min.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const __m512i low = _mm512_set1_epi32(0x0F);
  if (M == 1) {
    // Decoding: one activation row. Two accumulators break the FMA dependency chain, and the
    // min term is one dot product of the row's mins with the block sums of x.
    at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const uint8_t* row = qp + n * (K / 2);
        const float* srow = sp + n * nb;
        const float* mrow = mp + n * nb;
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        int64_t b = 0;
        for (; b + 1 < nb; b += 2) {
          __m512i q0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * 16)));
          __m512i q1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * 16 + 16)));
          const float* xb = xp + b * kBlock;
          __m512 d0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(q0, low)), _mm512_loadu_ps(xb));
          d0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(q0, 4)), _mm512_loadu_ps(xb + 16), d0);
          __m512 d1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(q1, low)), _mm512_loadu_ps(xb + 32));
          d1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(q1, 4)), _mm512_loadu_ps(xb + 48), d1);
          acc0 = _mm512_fmadd_ps(d0, _mm512_set1_ps(srow[b]), acc0);
          acc1 = _mm512_fmadd_ps(d1, _mm512_set1_ps(srow[b + 1]), acc1);
        }
        for (; b < nb; ++b) {
          __m512i q0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * 16)));
          const float* xb = xp + b * kBlock;
          __m512 d0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(q0, low)), _mm512_loadu_ps(xb));
          d0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(q0, 4)), _mm512_loadu_ps(xb + 16), d0);
          acc0 = _mm512_fmadd_ps(d0, _mm512_set1_ps(srow[b]), acc0);
        }
        __m512 mins = _mm512_setzero_ps();
        int64_t j = 0;
        for (; j + 16 <= nb; j += 16) mins = _mm512_fmadd_ps(_mm512_loadu_ps(mrow + j), _mm512_loadu_ps(xs + j), mins);
        float tail = 0.f;
        for (; j < nb; ++j) tail += mrow[j] * xs[j];
        yp[n] = hsum(_mm512_add_ps(acc0, acc1)) + hsum(mins) + tail;
      }
    });
    return y;
  }
  at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<__m512> acc(M);
    std::vector<float> acc_min(M);
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t m = 0; m < M; ++m) { acc[m] = _mm512_setzero_ps(); acc_min[m] = 0.f; }
      const uint8_t* row = qp + n * (K / 2);
      const float* srow = sp + n * nb;
      const float* mrow = mp + n * nb;
      for (int64_t b = 0; b < nb; ++b) {
        __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * 16)));
        __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(bytes, low));
        __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4));
        const __m512 s = _mm512_set1_ps(srow[b]);
        const float mn = mrow[b];
        for (int64_t m = 0; m < M; ++m) {
          const float* xb = xp + m * K + b * kBlock;
          __m512 dot = _mm512_mul_ps(lo, _mm512_loadu_ps(xb));
          dot = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb + 16), dot);
          acc[m] = _mm512_fmadd_ps(dot, s, acc[m]);
          acc_min[m] += mn * xs[m * nb + b];
        }
      }
      for (int64_t m = 0; m < M; ++m) yp[m * N + n] = hsum(acc[m]) + acc_min[m];
    }
  });
  return y;
}

torch::Tensor q8_matmul_f32(torch::Tensor x, torch::Tensor qs, torch::Tensor scale) {
  check(x, qs, scale, 1);
  TORCH_CHECK(qs.scalar_type() == torch::kChar, "q8 qs: int8");
  const int64_t M = x.size(0), K = x.size(1), N = qs.size(0), nb = K / kBlock;
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = qs.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (M == 1) {
    at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const int8_t* row = qp + n * K;
        const float* srow = sp + n * nb;
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        for (int64_t b = 0; b < nb; ++b) {
          __m256i q32 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * kBlock));
          const float* xb = xp + b * kBlock;
          __m512 dot = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q32))),
                                     _mm512_loadu_ps(xb));
          dot = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q32, 1))),
                                _mm512_loadu_ps(xb + 16), dot);
          if (b & 1) acc1 = _mm512_fmadd_ps(dot, _mm512_set1_ps(srow[b]), acc1);
          else acc0 = _mm512_fmadd_ps(dot, _mm512_set1_ps(srow[b]), acc0);
        }
        yp[n] = hsum(_mm512_add_ps(acc0, acc1));
      }
    });
    return y;
  }
  at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<__m512> acc(M);
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
      const int8_t* row = qp + n * K;
      const float* srow = sp + n * nb;
      for (int64_t b = 0; b < nb; ++b) {
        __m256i q32 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * kBlock));
        __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q32)));
        __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q32, 1)));
        const __m512 s = _mm512_set1_ps(srow[b]);
        for (int64_t m = 0; m < M; ++m) {
          const float* xb = xp + m * K + b * kBlock;
          __m512 dot = _mm512_mul_ps(lo, _mm512_loadu_ps(xb));
          dot = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb + 16), dot);
          acc[m] = _mm512_fmadd_ps(dot, s, acc[m]);
        }
      }
      for (int64_t m = 0; m < M; ++m) yp[m * N + n] = hsum(acc[m]);
    }
  });
  return y;
}

// Dense float32 [N, K] weights from blocks: for prompts, where a dense matmul (MKL) reuses each
// weight across many rows better than the row-at-a-time kernels above.
torch::Tensor dequantize(torch::Tensor qs, torch::Tensor scale, torch::Tensor min, bool q4) {
  const int64_t N = qs.size(0), K = q4 ? qs.size(1) * 2 : qs.size(1), nb = K / kBlock;
  auto w = torch::empty({N, K}, scale.options());
  float* wp = w.data_ptr<float>();
  const float* sp = scale.data_ptr<float>();
  const float* mp = q4 ? min.data_ptr<float>() : nullptr;
  const __m512i low = _mm512_set1_epi32(0x0F);
  at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t b = 0; b < nb; ++b) {
        const __m512 s = _mm512_set1_ps(sp[n * nb + b]);
        float* out = wp + n * K + b * kBlock;
        __m512 lo, hi;
        if (q4) {
          const uint8_t* row = qs.data_ptr<uint8_t>() + n * (K / 2) + b * 16;
          __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row)));
          const __m512 m = _mm512_set1_ps(mp[n * nb + b]);
          lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(q, low)), s, m);
          hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4)), s, m);
        } else {
          const int8_t* row = qs.data_ptr<int8_t>() + n * K + b * kBlock;
          __m256i q32 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row));
          lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q32))), s);
          hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q32, 1))), s);
        }
        _mm512_storeu_ps(out, lo);
        _mm512_storeu_ps(out + 16, hi);
      }
    }
  });
  return w;
}

// Entry points: any floating activations [..., K]; products in float32, returned in x's dtype.
torch::Tensor q4_matmul(torch::Tensor x, torch::Tensor qs, torch::Tensor scale, torch::Tensor min) {
  auto shape = x.sizes().vec();
  auto y = q4_matmul_f32(x.reshape({-1, shape.back()}).to(torch::kFloat).contiguous(), qs, scale, min);
  shape.back() = qs.size(0);
  return y.to(x.scalar_type()).view(shape);
}

torch::Tensor q8_matmul(torch::Tensor x, torch::Tensor qs, torch::Tensor scale) {
  auto shape = x.sizes().vec();
  auto y = q8_matmul_f32(x.reshape({-1, shape.back()}).to(torch::kFloat).contiguous(), qs, scale);
  shape.back() = qs.size(0);
  return y.to(x.scalar_type()).view(shape);
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

template <typename T>
void attend_impl(const T* q, const T* k, const T* v, const bool* allowed, T* out,
                 int64_t B, int64_t H, int64_t KV, int64_t Smax, int64_t S, int64_t hd, float scale) {
  const int64_t rep = H / KV, chunks = hd / 16;
  // Short caches are cheaper on one thread than waking the other.
  const int64_t grain = S * H * hd < (1 << 18) ? B * H : 1;
  at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> p(S);
    __m512 qv[8], acc[8];
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, h = i % H, g = h / rep;
      const T* kb = k + (b * KV + g) * Smax * hd;
      const T* vb = v + (b * KV + g) * Smax * hd;
      for (int64_t c = 0; c < chunks; ++c) qv[c] = _mm512_mul_ps(load16(q + i * hd + c * 16), _mm512_set1_ps(scale));
      float mx = -INFINITY;
      for (int64_t s = 0; s < S; ++s) {
        if (allowed && !allowed[b * S + s]) { p[s] = -INFINITY; continue; }
        const T* ks = kb + s * hd;
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
        const T* vs = vb + s * hd;
        for (int64_t c = 0; c < chunks; ++c) acc[c] = _mm512_fmadd_ps(ps, load16(vs + c * 16), acc[c]);
      }
      alignas(64) float tmp[16];
      for (int64_t c = 0; c < chunks; ++c) {
        _mm512_store_ps(tmp, _mm512_mul_ps(acc[c], _mm512_set1_ps(1.f / total)));
        for (int64_t d = 0; d < 16; ++d) out[i * hd + c * 16 + d] = static_cast<T>(tmp[d]);
      }
    }
  });
}

torch::Tensor attend_one(torch::Tensor q, torch::Tensor k, torch::Tensor v, int64_t S, torch::Tensor allowed,
                         double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && k.is_contiguous() && v.is_contiguous(), "attend_one: shapes");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(), "attend_one: dtypes differ");
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
  if (q.scalar_type() == torch::kFloat) {
    attend_impl(qc.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), ap, out.data_ptr<float>(),
                B, H, KV, Smax, S, hd, (float)scale);
  } else {
    TORCH_CHECK(q.scalar_type() == torch::kBFloat16, "attend_one: float32 or bfloat16");
    attend_impl(qc.data_ptr<at::BFloat16>(), k.data_ptr<at::BFloat16>(), v.data_ptr<at::BFloat16>(), ap,
                out.data_ptr<at::BFloat16>(), B, H, KV, Smax, S, hd, (float)scale);
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

template <typename T>
torch::Tensor decode_attention_impl(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor kc,
                                    torch::Tensor vc, int64_t start, torch::Tensor allowed, double scale,
                                    int64_t H) {
  const int64_t B = qkv.size(0), KV = kc.size(1), Smax = kc.size(2), hd = kc.size(3);
  auto q = torch::empty({B, H, hd}, qkv.options());
  const T* src = qkv.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  T* qp = q.data_ptr<T>();
  T* kp = kc.data_ptr<T>();
  T* vp = vc.data_ptr<T>();
  const int64_t width = (H + 2 * KV) * hd;
  for (int64_t b = 0; b < B; ++b) {
    const T* row = src + b * width;
    for (int64_t h = 0; h < H; ++h) rotate_into(row + h * hd, cp + b * hd, sp + b * hd, hd, qp + (b * H + h) * hd);
    for (int64_t g = 0; g < KV; ++g) {
      T* kslot = kp + ((b * KV + g) * Smax + start) * hd;
      rotate_into(row + (H + g) * hd, cp + b * hd, sp + b * hd, hd, kslot);
      std::copy(row + (H + KV + g) * hd, row + (H + KV + g + 1) * hd, vp + ((b * KV + g) * Smax + start) * hd);
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
  TORCH_CHECK(qkv.scalar_type() == kc.scalar_type() && cos.scalar_type() == qkv.scalar_type(),
              "decode_attention: dtypes differ");
  if (qkv.scalar_type() == torch::kFloat)
    return decode_attention_impl<float>(qkv, cos, sin, kc, vc, start, allowed, scale, H);
  TORCH_CHECK(qkv.scalar_type() == torch::kBFloat16, "decode_attention: float32 or bfloat16");
  return decode_attention_impl<at::BFloat16>(qkv, cos, sin, kc, vc, start, allowed, scale, H);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("q4_matmul", &q4_matmul, "x [..., K] @ q4 block weight [N, K]^T -> [..., N]");
  m.def("dequantize", &dequantize, "blocks -> dense float32 [N, K]");
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dim, float32 math");
  m.def("attend_one", &attend_one, "attention of one query per row against a cache");
  m.def("decode_attention", &decode_attention, "rotary + cache write + attention for one new token per row");
  m.def("q8_matmul", &q8_matmul, "x [..., K] @ q8 block weight [N, K]^T -> [..., N]");
}
