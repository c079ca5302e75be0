// Checks quant_core.h's kernels for the instruction set this file is compiled for (phi3::isa)
// against the plain C++ reference compiled alongside (phi3::ref), on deterministic pseudo-random
// inputs, with tests/test_quant.py's tolerances; and that a row's result is bit-identical
// whatever the number of rows in the call. tests/test_kernels_arm.py builds and runs it: natively
// on x86, and for aarch64 under qemu. Prints the build, one line per check, then
// "N passed, M failed"; exits 0 only if none failed.
//
//   g++ -std=c++17 -O2 -mavx2 -mfma -mf16c phi3/kernels/test_core.cpp -o test_core && ./test_core

#include "quant_core.h"

#include <cstdio>
#include <string>

namespace {

using phi3::bf16;
using phi3::Format;
using phi3::half;

int passed = 0, failed = 0;

void check(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  (ok ? passed : failed) += 1;
}

struct Random {  // splitmix64
  uint64_t state;
  uint64_t next() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  float uniform(float lo, float hi) { return lo + (hi - lo) * static_cast<float>(next() >> 40) * 0x1p-24f; }
};

// max |got - want| <= rel * max |want| + abs
template <typename T>
bool close(const std::vector<T>& got, const std::vector<T>& want, float rel, float abs = 0.f) {
  float err = 0.f, scale = 0.f;
  for (size_t i = 0; i < want.size(); ++i) {
    const float g = phi3::to_float(got[i]), w = phi3::to_float(want[i]);
    if (std::isnan(g) || std::isnan(w)) return false;
    err = std::max(err, std::fabs(g - w));
    scale = std::max(scale, std::fabs(w));
  }
  return err <= rel * scale + abs;
}

template <typename T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

bool same_half(uint16_t a, uint16_t b) {  // equal bits, or both NaN
  const auto is_nan = [](uint16_t h) { return (h & 0x7C00) == 0x7C00 && (h & 0x3FF); };
  return a == b || (is_nan(a) && is_nan(b));
}

void check_conversions(Random& rng) {
  int wrong = 0;
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float hw = phi3::half_to_float(h), sw = phi3::scalar_half_to_float(h);
    wrong += !(phi3::bits_of(hw) == phi3::bits_of(sw) || (std::isnan(hw) && std::isnan(sw)));
  }
  check(wrong == 0, "half -> float: all 65536 values, conversion instruction = integer converter");
  // Every half, the midpoints between neighbours (ties: to even), a float either side of them,
  // and random bit patterns.
  std::vector<float> probes;
  for (uint32_t h = 0; h < 0x7C00; ++h) {
    const float a = phi3::scalar_half_to_float(h), b = phi3::scalar_half_to_float(h + 1);
    const float mid = static_cast<float>((static_cast<double>(a) + b) / 2);
    for (float f : {a, mid, std::nextafter(mid, 0.f), std::nextafter(mid, 1e9f)}) {
      probes.push_back(f);
      probes.push_back(-f);
    }
  }
  for (int i = 0; i < 200000; ++i) probes.push_back(phi3::float_from_bits(static_cast<uint32_t>(rng.next())));
  wrong = 0;
  for (float f : probes) wrong += !same_half(phi3::float_to_half(f), phi3::scalar_float_to_half(f));
  check(wrong == 0, "float -> half: " + std::to_string(probes.size()) + " values, conversion instruction = integer converter");
  check(phi3::scalar_float_to_half(1.f) == 0x3C00 && phi3::scalar_float_to_half(65504.f) == 0x7BFF &&
        phi3::scalar_float_to_half(65520.f) == 0x7C00 && phi3::scalar_float_to_half(0x1p-24f) == 0x0001 &&
        phi3::scalar_float_to_half(0x1p-25f) == 0x0000 && phi3::scalar_float_to_half(0x1.8p-24f) == 0x0002 &&
        phi3::scalar_float_to_half(-0x1p-14f) == 0x8400 && phi3::scalar_half_to_float(0x0001) == 0x1p-24f,
        "integer half converter: known values (max, overflow, subnormals, ties)");
  check(phi3::float_to_bf16(1.f + 0x1p-8f) == 0x3F80 && phi3::float_to_bf16(1.f + 0x3p-8f) == 0x3F82 &&
        phi3::float_to_bf16(NAN) == 0x7FC0, "bfloat16: ties to even, NaN");
}

// A random weight in one format, with the storage its Weight points into.
struct TestWeight {
  std::vector<uint8_t> qs, qh, sc, mn;
  std::vector<uint16_t> d, m, dm;
  phi3::Weight w{};
};

TestWeight random_weight(Format fmt, int64_t N, int64_t K, Random& rng) {
  TestWeight t;
  const int64_t nb = K / phi3::kBlock;
  phi3::Weight& w = t.w;
  w.fmt = fmt; w.N = N; w.K = K; w.nb = nb;
  t.qs.resize(N * w.row_bytes());
  for (auto& q : t.qs) q = static_cast<uint8_t>(rng.next());
  const auto random_halves = [&](int64_t count, float lo, float hi) {
    std::vector<uint16_t> v(count);
    for (auto& h : v) h = phi3::scalar_float_to_half(rng.uniform(lo, hi));
    return v;
  };
  const auto random_bytes = [&](int64_t count, int modulus, int shift) {
    std::vector<uint8_t> v(count);
    for (auto& b : v) b = static_cast<uint8_t>(static_cast<int>(rng.next() % modulus) - shift);
    return v;
  };
  t.qh = random_bytes(N * nb * w.qh_bytes(), 256, 0);
  w.qh = t.qh.data();
  if (fmt == phi3::Q6_K || fmt == phi3::IQ4_XS) {  // int8 scales per 16 (q6_k) or 32, d per 256
    t.sc = fmt == phi3::Q6_K ? random_bytes(N * nb * 2, 256, 128) : random_bytes(N * nb, 64, 32);
    t.dm = random_halves(N * nb / 8, 0.0002f, 0.002f);
    w.sc = t.sc.data(); w.dm = t.dm.data();
  } else if (fmt == phi3::Q4_K || fmt == phi3::Q5_K) {
    t.sc.resize(N * nb);
    t.mn.resize(N * nb);
    for (auto& s : t.sc) s = rng.next() % 64;
    for (auto& s : t.mn) s = rng.next() % 64;
    t.dm = random_halves(N * nb / 4, 0.0002f, 0.002f);
    w.sc = t.sc.data(); w.mn = t.mn.data(); w.dm = t.dm.data();
  } else {
    t.d = random_halves(N * nb, 0.001f, 0.01f);
    w.d = t.d.data();
    if (fmt == phi3::Q4_1 || fmt == phi3::Q5_1) {
      t.m = random_halves(N * nb, -0.08f, 0.0f);
      w.m = t.m.data();
    }
  }
  w.qs = t.qs.data();
  return t;
}

std::vector<float> random_floats(int64_t count, Random& rng, float lo = -2.f, float hi = 2.f) {
  std::vector<float> v(count);
  for (auto& x : v) x = rng.uniform(lo, hi);
  return v;
}

template <typename Core>
std::vector<float> matmul_int8(const phi3::Weight& w, const float* x, int64_t M, int64_t rows_per_call = 0) {
  const auto xr = Core::quantize_rows(x, M, w.K, static_cast<Format>(w.fmt));
  std::vector<float> y(M * w.N);
  const int64_t step = rows_per_call ? rows_per_call : w.N;
  for (int64_t n = 0; n < w.N; n += step) Core::matmul_int8_rows(w, xr, y.data(), n, std::min(w.N, n + step));
  return y;
}

template <typename Core>
std::vector<float> matmul_float(const phi3::Weight& w, const float* x, int64_t M) {
  const auto xr = Core::prepare_float_rows(x, M, w.K);
  std::vector<float> y(M * w.N);
  Core::matmul_float_rows(w, xr, y.data(), 0, w.N);
  return y;
}

// The core's functions as one type, to pass either to the helpers above.
struct Isa {
  static auto quantize_rows(const float* x, int64_t M, int64_t K, Format f) { return phi3::isa::quantize_rows(x, M, K, f); }
  static void matmul_int8_rows(const phi3::Weight& w, const phi3::QuantizedRows& r, float* y, int64_t a, int64_t b) {
    phi3::isa::matmul_int8_rows(w, r, y, a, b);
  }
  static auto prepare_float_rows(const float* x, int64_t M, int64_t K) { return phi3::isa::prepare_float_rows(x, M, K); }
  static void matmul_float_rows(const phi3::Weight& w, const phi3::FloatRows& r, float* y, int64_t a, int64_t b) {
    phi3::isa::matmul_float_rows(w, r, y, a, b);
  }
};
struct Ref {
  static auto quantize_rows(const float* x, int64_t M, int64_t K, Format f) { return phi3::ref::quantize_rows(x, M, K, f); }
  static void matmul_int8_rows(const phi3::Weight& w, const phi3::QuantizedRows& r, float* y, int64_t a, int64_t b) {
    phi3::ref::matmul_int8_rows(w, r, y, a, b);
  }
  static auto prepare_float_rows(const float* x, int64_t M, int64_t K) { return phi3::ref::prepare_float_rows(x, M, K); }
  static void matmul_float_rows(const phi3::Weight& w, const phi3::FloatRows& r, float* y, int64_t a, int64_t b) {
    phi3::ref::matmul_float_rows(w, r, y, a, b);
  }
};

// Row m of each product in y [M, N] computed alone (M = 1) has the same bits as in the batch.
template <typename Solo>
bool batch_equals_solo(const std::vector<float>& batch, int64_t M, int64_t N, const float* x, int64_t K, Solo solo) {
  for (int64_t m = 0; m < M; ++m) {
    const std::vector<float> alone = solo(x + m * K);
    if (std::memcmp(alone.data(), batch.data() + m * N, N * sizeof(float)) != 0) return false;
  }
  return true;
}

// The dense weight in double, for the reference's own check.
std::vector<double> dense(const phi3::Weight& w) {
  std::vector<float> sw(2 * w.nb), mw(w.nb);
  std::vector<double> out(w.N * w.K);
  for (int64_t n = 0; n < w.N && w.wide(); ++n) {
    phi3::with_wide_format<phi3::WideScales, void>(w.fmt, w, n, sw.data(), mw.data());
    for (int64_t k = 0; k < w.K; ++k) {
      const int64_t b = k / phi3::kBlock, j = k % phi3::kBlock;
      const int code = phi3::wide_code(w.fmt, w.qs + n * w.row_bytes(), phi3::wide_qh_row(w, n), b, j);
      out[n * w.K + k] = static_cast<double>(sw[phi3::halves(w.fmt) * b + (w.fmt == phi3::Q6_K ? j / 16 : 0)]) * code + mw[b];
    }
  }
  for (int64_t n = 0; n < w.N && !w.wide(); ++n) {
    phi3::ref::row_scales(w, n, sw.data(), mw.data());
    for (int64_t k = 0; k < w.K; ++k) {
      const int64_t b = k / phi3::kBlock;
      out[n * w.K + k] = static_cast<double>(sw[b]) * phi3::ref::weight_code(w, w.qs + n * w.row_bytes(), b, k % phi3::kBlock) + mw[b];
    }
  }
  return out;
}

void check_format(Format fmt, const char* name, int64_t N, int64_t K, Random& rng) {
  const TestWeight t = random_weight(fmt, N, K, rng);
  const phi3::Weight& w = t.w;
  const std::string shape = std::string(name) + " N=" + std::to_string(N) + " K=" + std::to_string(K) +
                            " (" + std::to_string(w.nb) + " blocks)";
  // M = 10: full tiles of activation rows and a remainder (AVX2: q4 formats 6 + 4, the others
  // 8 + 2). Its inputs come from a
  // generator of its own, so that the other checks keep their draws (the 1e-2 bound against the
  // dense product is statistical: some draws of q5_k put the reference's own int8 error past it).
  Random own{0x5EED0000ull + static_cast<uint64_t>(fmt) * 4096 + static_cast<uint64_t>(K)};
  for (int64_t M : {1, 3, 10}) {
    std::vector<float> x = random_floats(M * K, M == 10 ? own : rng);
    std::fill(x.begin(), x.begin() + phi3::kBlock, 0.f);  // an all-zero block: scale 0
    const std::string tag = shape + " M=" + std::to_string(M);

    const auto qi = phi3::isa::quantize_rows(x.data(), M, K, fmt);
    const auto qr = phi3::ref::quantize_rows(x.data(), M, K, fmt);
    bool codes = true, scales = true;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) codes &= phi3::isa::activation_code(qi, fmt, m, k) == phi3::ref::activation_code(qr, fmt, m, k);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t b = 0; b < w.nb; ++b)
        scales &= phi3::bits_of(qi.dx[m * qi.nbp + b]) == phi3::bits_of(qr.dx[m * qr.nbp + b]) &&
                  phi3::bits_of(qi.xs[m * qi.nbp + b]) == phi3::bits_of(qr.xs[m * qr.nbp + b]);
    check(codes && scales, "activations to int8: same codes, scales and sums as the reference, " + tag);

    const auto int8 = matmul_int8<Isa>(w, x.data(), M);
    check(close(int8, matmul_int8<Ref>(w, x.data(), M), 1e-5f), "int8 matmul within 1e-5 of the reference, " + tag);
    check(same_bits(int8, matmul_int8<Isa>(w, x.data(), M, 7)), "int8 matmul: same bits in row ranges of 7, " + tag);
    check(batch_equals_solo(int8, M, N, x.data(), K, [&](const float* row) { return matmul_int8<Isa>(w, row, 1); }),
          "int8 matmul: each row's bits equal the row alone, " + tag);

    const auto exact = matmul_float<Isa>(w, x.data(), M);
    const auto exact_ref = matmul_float<Ref>(w, x.data(), M);
    check(close(exact, exact_ref, 1e-4f), "float matmul within 1e-4 of the reference, " + tag);
    check(batch_equals_solo(exact, M, N, x.data(), K, [&](const float* row) { return matmul_float<Isa>(w, row, 1); }),
          "float matmul: each row's bits equal the row alone, " + tag);
    std::vector<float> want(M * N);
    const std::vector<double> wd = dense(w);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        double s = 0;
        for (int64_t k = 0; k < K; ++k) s += wd[n * K + k] * x[m * K + k];
        want[m * N + n] = static_cast<float>(s);
      }
    check(close(exact_ref, want, 1e-4f), "reference float matmul within 1e-4 of the dense product, " + tag);
    check(close(int8, want, 1e-2f), "int8 matmul within 1e-2 of the dense product, " + tag);
  }
  std::vector<float> df(N * K), df_ref(N * K);
  phi3::isa::dequantize_rows(w, df.data(), 0, N);
  phi3::ref::dequantize_rows(w, df_ref.data(), 0, N);
  check(same_bits(df, df_ref), "dequantize to float32: the reference's bits, " + shape);
  std::vector<bf16> db(N * K), db_ref(N * K);
  phi3::isa::dequantize_rows(w, db.data(), 0, N);
  phi3::ref::dequantize_rows(w, db_ref.data(), 0, N);
  check(same_bits(db, db_ref), "dequantize to bfloat16: the reference's bits, " + shape);
}

// Every element of the int8 product against the exact sum of the same integer products (the
// reference's activation codes and scales, in double), within 1e-6 of the sum of the terms'
// magnitudes: float summation order allows ~1e-7 there (worst seen 7e-8), while one wrong block
// scale, min or code anywhere shows as 1e-3 or more. Activation rows 1..17 cover every remainder
// of AVX2's tiles (6 and 8 rows), N = 1, 5, 13 the four-weight-row groups' tails, and row ranges
// of 1 to 5 per call the tails at every start; for both the prompt kernel (matmul_int8_rows) and
// decoding's (matmul_int8_decode). (A relative tolerance on the whole output, as in
// check_format, let errors on small entries through.)
void check_int8_exact(Format fmt, const char* name, int64_t K, Random& rng) {
  bool ok = true, solo = true;
  double worst = 0;
  for (int64_t N : {1, 5, 13}) {
    const TestWeight t = random_weight(fmt, N, K, rng);
    const phi3::Weight& w = t.w;
    const int64_t H = phi3::halves(fmt);
    std::vector<float> sw(2 * w.nb + 16), mw(w.nb + 16);
    for (int64_t M = 1; M <= 17; ++M) {
      const std::vector<float> x = random_floats(M * K, rng);
      const auto qi = phi3::isa::quantize_rows(x.data(), M, K, fmt);
      const auto qr = phi3::ref::quantize_rows(x.data(), M, K, fmt);
      for (bool decode : {false, true}) {
      const auto matmul = decode ? phi3::isa::matmul_int8_decode : phi3::isa::matmul_int8_rows;
      std::vector<float> y(M * N);
      const int64_t step = 1 + M % 5;
      for (int64_t n = 0; n < N; n += step) matmul(w, qi, y.data(), n, std::min(N, n + step));
      for (int64_t n = 0; n < N; ++n) {
        const uint8_t* row = w.qs + n * w.row_bytes();
        if (w.wide()) phi3::with_wide_format<phi3::WideScales, void>(w.fmt, w, n, sw.data(), mw.data());
        else phi3::ref::row_scales(w, n, sw.data(), mw.data());
        for (int64_t m = 0; m < M; ++m) {
          double sum = 0, magnitude = 0;
          for (int64_t b = 0; b < w.nb; ++b) {
            const double dx = qr.dx[m * qr.nbp + b];
            for (int64_t h = 0; h < H; ++h) {
              int64_t dot = 0, size = 0;
              for (int64_t j = h * 32 / H; j < (h + 1) * 32 / H; ++j) {
                const int code = w.wide() ? phi3::wide_code(w.fmt, row, phi3::wide_qh_row(w, n), b, j)
                                          : phi3::ref::weight_code(w, row, b, j);
                const int64_t p = static_cast<int64_t>(code) * phi3::ref::activation_code(qr, fmt, m, b * 32 + j);
                dot += p;
                size += p < 0 ? -p : p;
              }
              const double scale = static_cast<double>(sw[H * b + h]) * dx;
              sum += static_cast<double>(dot) * scale;
              magnitude += static_cast<double>(size) * std::fabs(scale);
            }
            const double mins = static_cast<double>(mw[b]) * qr.xs[m * qr.nbp + b];
            sum += mins;
            magnitude += std::fabs(mins);
          }
          const double err = std::fabs(y[m * N + n] - sum);
          worst = std::max(worst, err / std::max(magnitude, 1e-30));
          ok &= err <= 1e-6 * magnitude;
        }
      }
      for (int64_t m = 0; m < M && solo; ++m) {
        const auto q1 = phi3::isa::quantize_rows(x.data() + m * K, 1, K, fmt);
        std::vector<float> alone(N);
        matmul(w, q1, alone.data(), 0, N);
        solo &= std::memcmp(alone.data(), y.data() + m * N, N * sizeof(float)) == 0;
      }
      }
    }
  }
  char buf[64];
  std::snprintf(buf, sizeof buf, " (worst %.1e)", worst);
  check(ok && solo, std::string("int8 matmul, prompt and decode kernels: every element within 1e-6 of the exact "
                                "sum of its terms, and each row's bits alone, M = 1..17, N = 1, 5, 13, ") +
                        name + " K=" + std::to_string(K) + buf);
}

template <typename T>
std::vector<T> cast(const std::vector<float>& v) {
  std::vector<T> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = phi3::from_float<T>(v[i]);
  return out;
}

template <typename T>
void check_rms_norm(const char* name, float tol, Random& rng) {
  const int64_t rows = 6, D = 96;
  const std::vector<T> x = cast<T>(random_floats(rows * D, rng)), w = cast<T>(random_floats(D, rng));
  std::vector<T> y(rows * D);
  phi3::rms_norm_rows(x.data(), w.data(), y.data(), D, 1e-5f, 0, rows);
  std::vector<float> want(rows * D);
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int64_t i = 0; i < D; ++i) ss += double(phi3::to_float(x[r * D + i])) * phi3::to_float(x[r * D + i]);
    const double inv = 1 / std::sqrt(ss / D + 1e-5);
    for (int64_t i = 0; i < D; ++i) want[r * D + i] = float(phi3::to_float(x[r * D + i]) * inv * phi3::to_float(w[i]));
  }
  std::vector<float> got(rows * D);
  for (size_t i = 0; i < got.size(); ++i) got[i] = phi3::to_float(y[i]);
  check(close(got, want, tol), std::string("rms_norm ") + name + " within " + (tol < 1e-3f ? "1e-5" : "2e-2") + " of double math");
}

// attend_head for T activations against a C cache: heads of dimension hd, S of Smax slots.
template <typename T, typename C>
void check_attention(const char* name, float tol, int64_t hd, bool masked, Random& rng) {
  const int64_t H = 3, S = 37, Smax = 50;
  const std::vector<T> q = cast<T>(random_floats(H * hd, rng));
  const std::vector<C> k = cast<C>(random_floats(Smax * hd, rng)), v = cast<C>(random_floats(Smax * hd, rng));
  bool allowed[S];
  for (int64_t s = 0; s < S; ++s) allowed[s] = s == S - 1 || rng.next() % 10 >= 3;
  std::vector<T> got(H * hd), want(H * hd);
  std::vector<float> p(S);
  for (int64_t h = 0; h < H; ++h) {
    phi3::isa::attend_head(q.data() + h * hd, k.data(), v.data(), masked ? allowed : nullptr, got.data() + h * hd, S,
                           hd, 0.1f, p.data());
    phi3::ref::attend_head(q.data() + h * hd, k.data(), v.data(), masked ? allowed : nullptr, want.data() + h * hd, S,
                           hd, 0.1f, p.data());
  }
  check(close(got, want, tol, 1e-6f), std::string("attend_head ") + name + " hd=" + std::to_string(hd) +
                                           (masked ? " masked" : "") + " within tolerance of the reference");
}

// A rotated key into a float16 cache: the rounding of the rotated value in the activations' type.
template <typename T>
void check_write_slot(const char* name, Random& rng) {
  const int64_t hd = 64;
  const std::vector<T> x = cast<T>(random_floats(hd, rng)), cos = cast<T>(random_floats(hd, rng, -1, 1)),
                       sin = cast<T>(random_floats(hd, rng, -1, 1));
  std::vector<T> rotated(hd), same(hd);
  phi3::rotate_into(x.data(), cos.data(), sin.data(), hd, rotated.data());
  std::vector<half> slot(hd);
  phi3::write_slot(x.data(), cos.data(), sin.data(), hd, true, slot.data());
  phi3::write_slot(x.data(), cos.data(), sin.data(), hd, true, same.data());
  bool ok = same_bits(same, rotated);
  for (int64_t d = 0; d < hd; ++d) ok &= slot[d].bits == phi3::scalar_float_to_half(phi3::to_float(rotated[d]));
  check(ok, std::string("write_slot ") + name + ": rotated key into a same-type and a float16 cache");
}

}  // namespace

int main() {
  std::printf("build: %s\n", phi3::kIsa);
  Random rng{42};
  check_conversions(rng);
  // Odd block counts exercise every path's tails: 3, 11 and 33 blocks; Q4_K needs multiples of 8.
  for (int64_t K : {96, 352, 1056}) {
    check_format(phi3::Q4_0, "q4_0", 37, K, rng);
    check_format(phi3::Q4_1, "q4_1", 37, K, rng);
    check_format(phi3::Q8_0, "q8_0", 37, K, rng);
  }
  for (int64_t K : {256, 768}) check_format(phi3::Q4_K, "q4_k", 21, K, rng);
  // The unpack-then-dot formats (q5_0, q5_1 and iq4_nl at any block count, the K-quants per 256).
  for (int64_t K : {96, 1056}) {
    check_format(phi3::Q5_0, "q5_0", 37, K, rng);
    check_format(phi3::Q5_1, "q5_1", 37, K, rng);
    check_format(phi3::IQ4_NL, "iq4_nl", 37, K, rng);
  }
  for (int64_t K : {256, 768}) {
    check_format(phi3::Q5_K, "q5_k", 21, K, rng);
    check_format(phi3::Q6_K, "q6_k", 21, K, rng);
    check_format(phi3::IQ4_XS, "iq4_xs", 21, K, rng);
  }
  {
    Random own{0xE1E3E47ull};  // its own draws, so that the checks above keep theirs
    for (auto [fmt, name] : {std::pair{phi3::Q4_0, "q4_0"}, {phi3::Q4_1, "q4_1"}, {phi3::Q8_0, "q8_0"},
                             {phi3::Q5_0, "q5_0"}, {phi3::Q5_1, "q5_1"}, {phi3::IQ4_NL, "iq4_nl"}})
      for (int64_t K : {32, 96, 576}) check_int8_exact(fmt, name, K, own);
    for (auto [fmt, name] : {std::pair{phi3::Q4_K, "q4_k"}, {phi3::Q5_K, "q5_k"}, {phi3::Q6_K, "q6_k"},
                             {phi3::IQ4_XS, "iq4_xs"}})
      for (int64_t K : {256, 768}) check_int8_exact(fmt, name, K, own);
  }
  check_rms_norm<float>("float32", 1e-5f, rng);
  check_rms_norm<bf16>("bfloat16", 2e-2f, rng);
  for (int64_t hd : {96, 128})
    for (bool masked : {true, false}) {
      check_attention<float, float>("float32", 1e-5f, hd, masked, rng);
      check_attention<float, half>("float32 with a float16 cache", 1e-5f, hd, masked, rng);
      check_attention<bf16, bf16>("bfloat16", 2e-2f, hd, masked, rng);
      check_attention<bf16, half>("bfloat16 with a float16 cache", 2e-2f, hd, masked, rng);
    }
  check_write_slot<float>("float32", rng);
  check_write_slot<bf16>("bfloat16", rng);
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
