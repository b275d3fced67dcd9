// babai_cpu::hptq_linear — an HPTQ layer y = s_n·(x·Cᵀ) + b on the CPU in one call
// (kernels/cpu_hptq.py states the layout and the math; this file is its kernel).
//
// The layout is one uint8 buffer (parse_layout). Rows (N window rows, then H hi rows, zero
// rows up to a multiple of 32) come in blocks of 32. Block b, column k: 16 bytes, byte j = nibble of row 32b + j (low) | nibble of row
// 32b + 16 + j (high). offsets[b, g, j] = o − 8 (int16) of row 32b + j in group g (−8 for hi rows).
// With S_g = Σ_{k∈g} x_k, a row's raw output is  Σ_k x_k·q_k + Σ_g (o_g − 8)·S_g  (fp32).
// Then  y_n = raw_n + 16·raw_{N+j} (hi_rows[j] = n) + Σ_e x_{c_e}·v_e (rows_e = n),
// out = s_n·y + b_n in x's dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kRows = 32;   // rows per block
constexpr int64_t kBytes = 16;  // bytes per block column
constexpr float kHiScale = 16.f;
constexpr int64_t kMinParallelWork = 1 << 16;  // weights × rows per thread, at least

// raw[m, 32 rows] of one block for BM ≤ 4 activation rows.
template <int BM>
void block_rows(const float* x, int64_t K, const uint8_t* w, const int16_t* off, const float* xs,
                int64_t G, float* raw, int64_t ld_raw) {
#if defined(__AVX512F__)
  __m512 a0[BM], a1[BM], b0[BM], b1[BM];
  for (int m = 0; m < BM; ++m) {
    a0[m] = a1[m] = b0[m] = b1[m] = _mm512_setzero_ps();
  }
  const __m512i low = _mm512_set1_epi32(15);
  int64_t k = 0;
  for (; k + 1 < K; k += 2) {  // two columns per step: two independent accumulator sets
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(w + k * kBytes)));
    const __m512i u = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(w + (k + 1) * kBytes)));
    const __m512 vl = _mm512_cvtepi32_ps(_mm512_and_si512(v, low));
    const __m512 vh = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
    const __m512 ul = _mm512_cvtepi32_ps(_mm512_and_si512(u, low));
    const __m512 uh = _mm512_cvtepi32_ps(_mm512_srli_epi32(u, 4));
    for (int m = 0; m < BM; ++m) {
      const __m512 xv = _mm512_set1_ps(x[m * K + k]);
      const __m512 xu = _mm512_set1_ps(x[m * K + k + 1]);
      a0[m] = _mm512_fmadd_ps(vl, xv, a0[m]);
      a1[m] = _mm512_fmadd_ps(vh, xv, a1[m]);
      b0[m] = _mm512_fmadd_ps(ul, xu, b0[m]);
      b1[m] = _mm512_fmadd_ps(uh, xu, b1[m]);
    }
  }
  for (; k < K; ++k) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(w + k * kBytes)));
    const __m512 vl = _mm512_cvtepi32_ps(_mm512_and_si512(v, low));
    const __m512 vh = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
    for (int m = 0; m < BM; ++m) {
      const __m512 xv = _mm512_set1_ps(x[m * K + k]);
      a0[m] = _mm512_fmadd_ps(vl, xv, a0[m]);
      a1[m] = _mm512_fmadd_ps(vh, xv, a1[m]);
    }
  }
  for (int m = 0; m < BM; ++m) {
    __m512 c0 = _mm512_add_ps(a0[m], b0[m]);
    __m512 c1 = _mm512_add_ps(a1[m], b1[m]);
    for (int64_t g = 0; g < G; ++g) {
      const __m512 s = _mm512_set1_ps(xs[m * G + g]);
      const __m512 o0 = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm256_loadu_si256((const __m256i*)(off + g * kRows))));
      const __m512 o1 = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm256_loadu_si256((const __m256i*)(off + g * kRows + 16))));
      c0 = _mm512_fmadd_ps(o0, s, c0);
      c1 = _mm512_fmadd_ps(o1, s, c1);
    }
    _mm512_storeu_ps(raw + m * ld_raw, c0);
    _mm512_storeu_ps(raw + m * ld_raw + 16, c1);
  }
#else
  for (int m = 0; m < BM; ++m) {
    float acc[kRows] = {0.f};
    for (int64_t k = 0; k < K; ++k) {
      const float xk = x[m * K + k];
      for (int64_t j = 0; j < kBytes; ++j) {
        const uint8_t byte = w[k * kBytes + j];
        acc[j] += xk * float(byte & 15);
        acc[j + kBytes] += xk * float(byte >> 4);
      }
    }
    for (int64_t g = 0; g < G; ++g)
      for (int64_t j = 0; j < kRows; ++j) acc[j] += float(off[g * kRows + j]) * xs[m * G + g];
    for (int64_t j = 0; j < kRows; ++j) raw[m * ld_raw + j] = acc[j];
  }
#endif
}

// x [M, K] widened to fp32 into xp, and S_g = Σ_{k∈g} x_k into xs (when not null).
template <typename T>
void widen(const T* x, int64_t M, int64_t K, int64_t group, float* xp, float* xs) {
  for (int64_t i = 0; i < M * K; ++i) xp[i] = float(x[i]);
  if (xs == nullptr) return;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < K / group; ++g) {
      float sum = 0.f;
      for (int64_t k = g * group; k < (g + 1) * group; ++k) sum += xp[m * K + k];
      xs[m * (K / group) + g] = sum;
    }
}

// y_n = s_n·row_n (+ b_n), cast to T.
template <typename T>
void finish(const float* row, const float* s, int64_t ns, const float* b, int64_t N, T* y) {
  if (ns == 1 && b == nullptr) {
    for (int64_t n = 0; n < N; ++n) y[n] = T(row[n] * s[0]);
  } else if (ns == 1) {
    for (int64_t n = 0; n < N; ++n) y[n] = T(row[n] * s[0] + b[n]);
  } else if (b == nullptr) {
    for (int64_t n = 0; n < N; ++n) y[n] = T(row[n] * s[n]);
  } else {
    for (int64_t n = 0; n < N; ++n) y[n] = T(row[n] * s[n] + b[n]);
  }
}

bool float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// The parts of kernels/cpu_hptq.py's pack_layout buffer: an int64 header (magic, blocks,
// K, groups, hi rows, entries, scales, out_features), then blocks, offsets, scales, hi rows,
// rows, cols, val, each at a multiple of 64 bytes.
struct Layout {
  int64_t nb, K, G, H, E, ns, N;
  const uint8_t* blocks;
  const int16_t* offsets;
  const float* scales;
  const int32_t* hi_rows;
  const int32_t* rows;
  const int32_t* cols;
  const float* val;
};

constexpr int64_t kMagic = 0x4250545148;
constexpr int64_t kAlign = 64;

Layout parse_layout(const at::Tensor& buffer) {
  TORCH_CHECK(buffer.scalar_type() == at::kByte && buffer.dim() == 1 && buffer.is_contiguous() &&
                  buffer.numel() >= 64,
              "hptq_linear: the layout must be a contiguous uint8 buffer (cpu_hptq.pack_layout)");
  const uint8_t* base = buffer.const_data_ptr<uint8_t>();
  TORCH_CHECK(reinterpret_cast<uintptr_t>(base) % kAlign == 0,
              "hptq_linear: the layout buffer must start 64-byte aligned (do not slice it)");
  const int64_t* h = reinterpret_cast<const int64_t*>(base);
  TORCH_CHECK(h[0] == kMagic, "hptq_linear: not an HPTQ CPU layout (wrong magic): rebuild it");
  Layout l{h[1], h[2], h[3], h[4], h[5], h[6], h[7]};
  TORCH_CHECK(l.nb > 0 && l.K > 0 && l.G > 0 && l.K % l.G == 0 && l.H >= 0 && l.E >= 0 &&
                  (l.ns == 1 || l.ns == l.N) && l.N > 0 && l.N + l.H <= l.nb * kRows,
              "hptq_linear: the layout header is inconsistent: rebuild the layout");
  int64_t at = 8 * 8;
  auto take = [&](int64_t bytes) {
    at += (kAlign - at % kAlign) % kAlign;
    const uint8_t* p = base + at;
    at += bytes;
    return p;
  };
  l.blocks = take(l.nb * l.K * kBytes);
  l.offsets = reinterpret_cast<const int16_t*>(take(l.nb * l.G * kRows * 2));
  l.scales = reinterpret_cast<const float*>(take(l.ns * 4));
  l.hi_rows = reinterpret_cast<const int32_t*>(take(l.H * 4));
  l.rows = reinterpret_cast<const int32_t*>(take(l.E * 4));
  l.cols = reinterpret_cast<const int32_t*>(take(l.E * 4));
  l.val = reinterpret_cast<const float*>(take(l.E * 4));
  TORCH_CHECK(at <= buffer.numel(), "hptq_linear: the layout buffer is truncated: rebuild it");
  return l;
}

// No ATen op is called on the way (each costs a dispatch, ~0.5 µs, at decode sizes a few
// percent of the layer): activations are widened into a per-thread buffer, the raw block
// outputs live there too, and the one allocation is the output.
at::Tensor hptq_linear(const at::Tensor& x_in, const at::Tensor& layout,
                       const c10::optional<at::Tensor>& bias, int64_t out_features) {
  const Layout l = parse_layout(layout);
  const int64_t nb = l.nb, K = l.K, G = l.G, H = l.H, N = l.N, E = l.E;
  TORCH_CHECK(out_features == N, "hptq_linear: out_features ", out_features, " but the layout has ", N);
  TORCH_CHECK(x_in.size(-1) == K, "hptq_linear: x has ", x_in.size(-1), " features, the weight ", K);
  TORCH_CHECK(float_dtype(x_in.scalar_type()), "hptq_linear: x must be fp32, bf16 or fp16");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias)
    TORCH_CHECK(bias->numel() == N && bias->is_contiguous() && float_dtype(bias->scalar_type()),
                "hptq_linear: bias must be a contiguous float tensor of out_features");
  const at::Tensor x = x_in.is_contiguous() ? x_in : x_in.contiguous();
  const at::ScalarType xt = x.scalar_type();
  const int64_t M = x.numel() / K, group = K / G, ld = nb * kRows;
  auto shape = x.sizes().vec();
  shape.back() = N;
  if (M == 0) return at::empty(shape, x.options());

  thread_local std::vector<float> buffer;  // [M, K] x, [M, G] S_g, [M, ld] raw
  buffer.resize(M * (K + G + ld));
  float* xp = buffer.data();
  float* xsp = xp + M * K;
  float* rp = xsp + M * G;
  switch (xt) {
    case at::kBFloat16: widen(x.const_data_ptr<c10::BFloat16>(), M, K, group, xp, xsp); break;
    case at::kHalf: widen(x.const_data_ptr<c10::Half>(), M, K, group, xp, xsp); break;
    default: widen(x.const_data_ptr<float>(), M, K, group, xp, xsp);
  }
  const uint8_t* wp = l.blocks;
  const int16_t* op = l.offsets;
  // whole blocks per thread; a layer too small to pay for waking a thread runs inline
  const int64_t grain = std::max<int64_t>(1, kMinParallelWork / (kRows * K * M));
  at::parallel_for(0, nb, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* w = wp + b * K * kBytes;
      const int16_t* off = op + b * G * kRows;
      for (int64_t m = 0; m < M; m += 4) {
        const float* xm = xp + m * K;
        const float* sm = xsp + m * G;
        float* out = rp + m * ld + b * kRows;
        switch (std::min<int64_t>(4, M - m)) {
          case 4: block_rows<4>(xm, K, w, off, sm, G, out, ld); break;
          case 3: block_rows<3>(xm, K, w, off, sm, G, out, ld); break;
          case 2: block_rows<2>(xm, K, w, off, sm, G, out, ld); break;
          default: block_rows<1>(xm, K, w, off, sm, G, out, ld);
        }
      }
    }
  });
  // epilogue: hi rows and sparse entries into their rows, then s_n·y + b_n in x's dtype
  const int32_t* hp = l.hi_rows;
  const int32_t* rr = l.rows;
  const int32_t* cc = l.cols;
  const float* vp = l.val;
  const float* sp = l.scales;
  const int64_t ns = l.ns;
  const float* bp = nullptr;  // the bias as fp32: read in place, widened only if bf16/fp16
  if (has_bias) {
    const at::ScalarType bt = bias->scalar_type();
    if (bt == at::kFloat) {
      bp = bias->const_data_ptr<float>();
    } else {
      thread_local std::vector<float> bias_buffer;
      bias_buffer.resize(N);
      if (bt == at::kBFloat16) widen(bias->const_data_ptr<c10::BFloat16>(), 1, N, N, bias_buffer.data(), nullptr);
      else widen(bias->const_data_ptr<c10::Half>(), 1, N, N, bias_buffer.data(), nullptr);
      bp = bias_buffer.data();
    }
  }
  at::Tensor y = at::empty(shape, x.options());
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      float* row = rp + m * ld;
      const float* xm = xp + m * K;
      for (int64_t j = 0; j < H; ++j) row[hp[j]] += kHiScale * row[N + j];
      for (int64_t e = 0; e < E; ++e) row[rr[e]] += xm[cc[e]] * vp[e];
      switch (xt) {
        case at::kBFloat16: finish(row, sp, ns, bp, N, y.data_ptr<c10::BFloat16>() + m * N); break;
        case at::kHalf: finish(row, sp, ns, bp, N, y.data_ptr<c10::Half>() + m * N); break;
        default: finish(row, sp, ns, bp, N, y.data_ptr<float>() + m * N);
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(babai_cpu, m) {
  m.def("hptq_linear(Tensor x, Tensor layout, Tensor? bias, int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(babai_cpu, CPU, m) { m.impl("hptq_linear", &hptq_linear); }
