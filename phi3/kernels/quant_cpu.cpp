// The CPU kernels' PyTorch binding: tensor checks, rows split across threads with
// at::parallel_for, and the Python functions. The arithmetic, the block layout and the two ways
// to multiply are in quant_core.h; cpu_kernels.py compiles this file once per instruction set
// (AVX-512 VNNI, AVX2, NEON), and the compiler flags pick quant_core.h's code for it.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <vector>

#include "quant_core.h"

namespace {

namespace core = phi3::isa;
using phi3::bf16;
using phi3::half;
using phi3::Weight;

// quant_core.h's 16-bit floats hold the same bits as PyTorch's.
template <typename T> struct TorchType { using type = T; };
template <> struct TorchType<bf16> { using type = at::BFloat16; };
template <> struct TorchType<half> { using type = at::Half; };
static_assert(sizeof(at::BFloat16) == sizeof(bf16) && sizeof(at::Half) == sizeof(half));

template <typename T>
T* data(const torch::Tensor& t) {  // data_ptr with its dtype check, as quant_core.h's type
  return reinterpret_cast<T*>(t.data_ptr<typename TorchType<T>::type>());
}

Weight make_weight(int64_t fmt, const torch::Tensor& qs, const torch::Tensor& qh, const torch::Tensor& a,
                   const torch::Tensor& b, const torch::Tensor& c) {
  TORCH_CHECK(fmt >= phi3::Q4_0 && fmt <= phi3::IQ4_XS, "unknown block format ", fmt);
  TORCH_CHECK(qs.dim() == 2 && qs.is_contiguous() && qh.is_contiguous() && a.is_contiguous() && b.is_contiguous() &&
              c.is_contiguous(), "block weight tensors must be contiguous");
  Weight w{};
  w.fmt = fmt;
  w.N = qs.size(0);
  w.K = fmt == phi3::Q8_0 ? qs.size(1) : qs.size(1) * 2;
  w.nb = w.K / phi3::kBlock;
  TORCH_CHECK(w.K % phi3::kBlock == 0, "K must be a multiple of 32");
  const int64_t blocks = w.N * w.nb;
  TORCH_CHECK(a.numel() == (fmt == phi3::Q6_K ? 2 : 1) * blocks, "block scales: expected ",
              (fmt == phi3::Q6_K ? 2 : 1) * blocks, " values, got ", a.numel());
  TORCH_CHECK(qh.numel() == blocks * w.qh_bytes() && qh.scalar_type() == torch::kUInt8, "high-bit planes: expected ",
              blocks * w.qh_bytes(), " bytes, got ", qh.numel());
  w.qs = static_cast<const uint8_t*>(qs.data_ptr());
  w.qh = qh.data_ptr<uint8_t>();
  const auto half_ptr = [](const torch::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::Half>()); };
  if (fmt == phi3::Q4_K || fmt == phi3::Q5_K) {
    TORCH_CHECK(w.nb % 8 == 0 && b.numel() == blocks && c.numel() == blocks / 4, "q4_k, q5_k: scale shapes");
    w.sc = a.data_ptr<uint8_t>();
    w.mn = b.data_ptr<uint8_t>();
    w.dm = half_ptr(c);
  } else if (fmt == phi3::Q6_K || fmt == phi3::IQ4_XS) {  // int8 scales, d per 256
    TORCH_CHECK(w.nb % 8 == 0 && c.numel() == blocks / 8, "q6_k, iq4_xs: scale shapes");
    w.sc = reinterpret_cast<const uint8_t*>(a.data_ptr<int8_t>());
    w.dm = half_ptr(c);
  } else {
    w.d = half_ptr(a);
    if (fmt == phi3::Q4_1 || fmt == phi3::Q5_1) {
      TORCH_CHECK(b.numel() == blocks, "q4_1, q5_1: mins shape");
      w.m = half_ptr(b);
    }
  }
  return w;
}

// Rows per task: each thread streams a long contiguous stretch of weights.
constexpr int64_t kGrain = 32;
// Activation rows per pass over the weights in block_matmul (see there): 8192x3072 Q4_0 times 512
// rows, 2 threads, idle Zen 5: avx2 255 ms in one pass, 158 ms in chunks of 16 (avx512: 204, 147);
// chunks of 4 unpack each weight row too often (2.5x slower than one pass). AVX2's tiles take 6
// (q4) or 8 rows at a time (quant_core.h's tile_rows), so 24 fill them (q4_0 3072x3072 times 96
// rows, one thread: 9.0 ms in chunks of 16, 8.4 in 24).
#if defined(PHI3_AVX2)
constexpr int64_t kRowChunk = 24;
#else
constexpr int64_t kRowChunk = 16;
#endif

}  // namespace

// x [..., K] (any float dtype) @ W^T -> [..., N] in x's dtype, products in float32. `decode`: x's
// rows are one new token each of separate sequences (quant_core.h's matmul_int8_decode, the
// fastest kernel at one row), else a prompt's tokens (matmul_int8_rows); each gives a row the
// same bits in any batch.
torch::Tensor block_matmul(torch::Tensor x, int64_t fmt, torch::Tensor qs, torch::Tensor qh, torch::Tensor a,
                           torch::Tensor b, torch::Tensor c, bool int8_activations, bool decode) {
  const Weight w = make_weight(fmt, qs, qh, a, b, c);
  auto shape = x.sizes().vec();
  TORCH_CHECK(shape.back() == w.K, "K mismatch: x has ", shape.back(), ", weight ", w.K);
  auto xf = x.reshape({-1, w.K}).to(torch::kFloat).contiguous();
  const int64_t M = xf.size(0);
  auto y = torch::empty({M, w.N}, xf.options());
  float* yp = y.data_ptr<float>();
  if (int8_activations) {
    // Rows in chunks of kRowChunk (a prompt's many rows): every weight row passes over all of a
    // chunk's int8 activations, and a chunk of them stays in cache where a whole prompt's would
    // not. Each row is computed as it is alone, so chunking changes no bit.
    for (int64_t m0 = 0; m0 < M; m0 += kRowChunk) {
      const int64_t rows = std::min(kRowChunk, M - m0);
      const auto xr = core::quantize_rows(xf.data_ptr<float>() + m0 * w.K, rows, w.K, static_cast<phi3::Format>(fmt));
      float* yc = yp + m0 * w.N;
      at::parallel_for(0, w.N, kGrain, [&](int64_t begin, int64_t end) {
        if (decode) core::matmul_int8_decode(w, xr, yc, begin, end);
        else core::matmul_int8_rows(w, xr, yc, begin, end);
      });
    }
  } else {
    const auto xr = core::prepare_float_rows(xf.data_ptr<float>(), M, w.K);
    at::parallel_for(0, w.N, kGrain, [&](int64_t begin, int64_t end) { core::matmul_float_rows(w, xr, yp, begin, end); });
  }
  shape.back() = w.N;
  return y.to(x.scalar_type()).view(shape);
}

// Dense [N, K] weights (float32 or bfloat16) from blocks: for prompts, where a dense matmul
// reuses each weight across many rows better than the row-at-a-time kernels above.
torch::Tensor block_dequantize(int64_t fmt, torch::Tensor qs, torch::Tensor qh, torch::Tensor a, torch::Tensor b,
                               torch::Tensor c, c10::ScalarType dtype) {
  const Weight w = make_weight(fmt, qs, qh, a, b, c);
  TORCH_CHECK(dtype == torch::kFloat || dtype == torch::kBFloat16, "dequantize: float32 or bfloat16");
  auto out = torch::empty({w.N, w.K}, qs.options().dtype(dtype));
  at::parallel_for(0, w.N, kGrain, [&](int64_t begin, int64_t end) {
    if (dtype == torch::kFloat) core::dequantize_rows(w, data<float>(out), begin, end);
    else core::dequantize_rows(w, data<bf16>(out), begin, end);
  });
  return out;
}

// --- Decoding helpers: small ops that PyTorch's CPU kernels make expensive at batch 1 ---------
// (bfloat16 SDPA costs ~60 us and bfloat16 rms_norm ~19 us per call on our test CPU; these take a
// few microseconds, computing in float32 whatever the storage type.)

template <typename T>
void rms_norm_impl(const torch::Tensor& x, const torch::Tensor& w, torch::Tensor& y, float eps) {
  const int64_t D = x.size(-1), rows = x.numel() / D;
  const T* xp = data<T>(x);
  const T* wp = data<T>(w);
  T* yp = data<T>(y);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) { phi3::rms_norm_rows(xp, wp, yp, D, eps, begin, end); });
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "rms_norm: x and weight dtypes differ");
  auto xc = x.contiguous();
  auto y = torch::empty_like(xc);
  if (x.scalar_type() == torch::kFloat) {
    rms_norm_impl<float>(xc, w, y, (float)eps);
  } else {
    TORCH_CHECK(x.scalar_type() == torch::kBFloat16, "rms_norm: float32 or bfloat16");
    rms_norm_impl<bf16>(xc, w, y, (float)eps);
  }
  return y;
}

// One query per row against a layer's cache: q [B, H, hd]; k, v [B, KV, Smax, hd] (the first S
// slots hold keys); allowed [B, S] bool or empty (all allowed). Returns [B, H, hd] in q's dtype.
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
      core::attend_head(q + i * hd, k + (b * KV + g) * Smax * hd, v + (b * KV + g) * Smax * hd,
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
      attend_impl(data<T>(qc), data<half>(k), data<half>(v), ap, data<T>(out), B, H, KV, Smax, S, hd, (float)scale);
    else
      attend_impl(data<T>(qc), data<T>(k), data<T>(v), ap, data<T>(out), B, H, KV, Smax, S, hd, (float)scale);
  };
  if (q.scalar_type() == torch::kFloat) {
    run(float{});
  } else {
    TORCH_CHECK(q.scalar_type() == torch::kBFloat16, "attend_one: float32 or bfloat16");
    run(bf16{});
  }
  return out;
}

// A whole attention block for one new token per row, after the qkv projection: rotate q and k
// (rotate-half convention, cos/sin already scaled), write k and v into the cache at slot `start`,
// attend over slots [0, start]. qkv [B, (H + 2 KV) hd]; cos, sin [B, hd]; caches [B, KV, Smax, hd].
template <typename T, typename C>
torch::Tensor decode_attention_impl(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor kc,
                                    torch::Tensor vc, int64_t start, torch::Tensor allowed, double scale,
                                    int64_t H) {
  const int64_t B = qkv.size(0), KV = kc.size(1), Smax = kc.size(2), hd = kc.size(3);
  auto q = torch::empty({B, H, hd}, qkv.options());
  const T* src = data<T>(qkv);
  const T* cp = data<T>(cos);
  const T* sp = data<T>(sin);
  T* qp = data<T>(q);
  C* kp = data<C>(kc);
  C* vp = data<C>(vc);
  const int64_t width = (H + 2 * KV) * hd;
  for (int64_t b = 0; b < B; ++b) {
    const T* row = src + b * width;
    for (int64_t h = 0; h < H; ++h) phi3::rotate_into(row + h * hd, cp + b * hd, sp + b * hd, hd, qp + (b * H + h) * hd);
    for (int64_t g = 0; g < KV; ++g) {
      phi3::write_slot(row + (H + g) * hd, cp + b * hd, sp + b * hd, hd, true, kp + ((b * KV + g) * Smax + start) * hd);
      phi3::write_slot(row + (H + KV + g) * hd, cp, sp, hd, false, vp + ((b * KV + g) * Smax + start) * hd);
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
    return half_cache ? decode_attention_impl<float, half>(qkv, cos, sin, kc, vc, start, allowed, scale, H)
                      : decode_attention_impl<float, float>(qkv, cos, sin, kc, vc, start, allowed, scale, H);
  TORCH_CHECK(qkv.scalar_type() == torch::kBFloat16, "decode_attention: float32 or bfloat16");
  return half_cache ? decode_attention_impl<bf16, half>(qkv, cos, sin, kc, vc, start, allowed, scale, H)
                    : decode_attention_impl<bf16, bf16>(qkv, cos, sin, kc, vc, start, allowed, scale, H);
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
  const T* src = data<T>(qkv);
  const T* cp = data<T>(cos);
  const T* sp = data<T>(sin);
  T* qp = data<T>(q);
  std::vector<C*> kbase(M), vbase(M);
  std::vector<const bool*> ap(M);
  std::vector<int64_t> smax(M);
  int64_t longest = 0, work = 0;
  for (int64_t b = 0; b < M; ++b) {
    smax[b] = ks[b].size(3);
    TORCH_CHECK(starts[b] < smax[b], "decode_attention_many: cache full");
    kbase[b] = data<C>(ks[b]) + layer * KV * smax[b] * hd;
    vbase[b] = data<C>(vs[b]) + layer * KV * smax[b] * hd;
    ap[b] = allowed[b].numel() ? allowed[b].data_ptr<bool>() : nullptr;
    longest = std::max(longest, starts[b] + 1);
    work += (starts[b] + 1) * H * hd;
    const T* row = src + b * width;
    for (int64_t h = 0; h < H; ++h) phi3::rotate_into(row + h * hd, cp + b * hd, sp + b * hd, hd, qp + (b * H + h) * hd);
    for (int64_t g = 0; g < KV; ++g) {
      phi3::write_slot(row + (H + g) * hd, cp + b * hd, sp + b * hd, hd, true, kbase[b] + (g * smax[b] + starts[b]) * hd);
      phi3::write_slot(row + (H + KV + g) * hd, cp, sp, hd, false, vbase[b] + (g * smax[b] + starts[b]) * hd);
    }
  }
  T* op = data<T>(out);
  const int64_t grain = work < (1 << 18) ? M * H : 1;
  at::parallel_for(0, M * H, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> p(longest);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, h = i % H, g = h / rep;
      core::attend_head(qp + i * hd, kbase[b] + g * smax[b] * hd, vbase[b] + g * smax[b] * hd, ap[b], op + i * hd,
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
        ? decode_attention_many_impl<float, half>(qkv, cos, sin, ks, vs, layer, starts, allowed, scale, H)
        : decode_attention_many_impl<float, float>(qkv, cos, sin, ks, vs, layer, starts, allowed, scale, H);
  TORCH_CHECK(qkv.scalar_type() == torch::kBFloat16, "decode_attention_many: float32 or bfloat16");
  return half_cache ? decode_attention_many_impl<bf16, half>(qkv, cos, sin, ks, vs, layer, starts, allowed, scale, H)
                    : decode_attention_many_impl<bf16, bf16>(qkv, cos, sin, ks, vs, layer, starts, allowed, scale, H);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("block_matmul", &block_matmul, "x [..., K] @ block weight [N, K]^T -> [..., N]");
  m.def("block_dequantize", &block_dequantize, "blocks -> dense [N, K]");
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dim, float32 math");
  m.def("attend_one", &attend_one, "attention of one query per row against a cache");
  m.def("decode_attention", &decode_attention, "rotary + cache write + attention for one new token per row");
  m.def("decode_attention_many", &decode_attention_many, "decode_attention for rows with caches of their own");
}
