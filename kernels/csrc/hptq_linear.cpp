// babai_cpu::hptq_linear — an HPTQ layer y = s_n·(x·Cᵀ) + b on the CPU in one call
// (kernels/cpu_hptq.py states the layout and the math; this file is its kernel).
//
// Rows (N window rows, then H hi rows, zero rows up to a multiple of 32) come in blocks of
// 32. Block b, column k: 16 bytes, byte j = nibble of row 32b + j (low) | nibble of row
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

// No ATen op is called on the way (each costs a dispatch, ~0.5 µs, at decode sizes a few
// percent of the layer): activations are widened into a per-thread buffer, the raw block
// outputs live there too, and the one allocation is the output.
at::Tensor hptq_linear(const at::Tensor& x_in, const at::Tensor& blocks, const at::Tensor& offsets,
                       const at::Tensor& scales, const at::Tensor& hi_rows,
                       const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& val,
                       const c10::optional<at::Tensor>& bias, int64_t out_features) {
  const int64_t nb = blocks.size(0), K = blocks.size(1), G = offsets.size(1);
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.dim() == 3 && blocks.size(2) == kBytes &&
                  blocks.is_contiguous() && offsets.is_contiguous(),
              "hptq_linear: blocks must be contiguous uint8 [row blocks, K, 16]");
  TORCH_CHECK(offsets.scalar_type() == at::kShort && offsets.size(0) == nb &&
                  offsets.size(2) == kRows && K % G == 0,
              "hptq_linear: offsets must be int16 [row blocks, groups, 32] with groups | K");
  TORCH_CHECK(x_in.size(-1) == K, "hptq_linear: x has ", x_in.size(-1), " features, the weight ", K);
  TORCH_CHECK(float_dtype(x_in.scalar_type()), "hptq_linear: x must be fp32, bf16 or fp16");
  const int64_t H = hi_rows.numel(), N = out_features, E = val.numel();
  TORCH_CHECK(N + H <= nb * kRows, "hptq_linear: out_features + hi rows exceed the blocks");
  for (const at::Tensor* t : {&hi_rows, &rows, &cols})
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous(),
                "hptq_linear: hi_rows, rows and cols must be contiguous int32");
  TORCH_CHECK(rows.numel() == E && cols.numel() == E, "hptq_linear: rows, cols, val differ in length");
  TORCH_CHECK(val.scalar_type() == at::kFloat && val.is_contiguous() &&
                  scales.scalar_type() == at::kFloat && scales.is_contiguous(),
              "hptq_linear: val and scales must be contiguous fp32");
  TORCH_CHECK(scales.numel() == 1 || scales.numel() == N, "hptq_linear: scales must be [1] or [N]");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias)
    TORCH_CHECK(bias->numel() == N && bias->is_contiguous() && float_dtype(bias->scalar_type()),
                "hptq_linear: bias must be a contiguous float tensor of out_features");
  const at::Tensor x = x_in.is_contiguous() ? x_in : x_in.contiguous();
  const at::ScalarType xt = x.scalar_type();
  const int64_t M = x.numel() / K, group = K / G, ld = nb * kRows;

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
  const uint8_t* wp = blocks.const_data_ptr<uint8_t>();
  const int16_t* op = offsets.const_data_ptr<int16_t>();
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
  const int32_t* hp = hi_rows.const_data_ptr<int32_t>();
  const int32_t* rr = rows.const_data_ptr<int32_t>();
  const int32_t* cc = cols.const_data_ptr<int32_t>();
  const float* vp = val.const_data_ptr<float>();
  const float* sp = scales.const_data_ptr<float>();
  const int64_t ns = scales.numel();
  float* bp = nullptr;  // the bias as fp32 (after x, S_g and raw in the buffer)
  if (has_bias) {
    thread_local std::vector<float> bias_buffer;
    bias_buffer.resize(N);
    bp = bias_buffer.data();
    const at::ScalarType bt = bias->scalar_type();
    if (bt == at::kBFloat16) widen(bias->const_data_ptr<c10::BFloat16>(), 1, N, N, bp, nullptr);
    else if (bt == at::kHalf) widen(bias->const_data_ptr<c10::Half>(), 1, N, N, bp, nullptr);
    else widen(bias->const_data_ptr<float>(), 1, N, N, bp, nullptr);
  }
  auto shape = x.sizes().vec();
  shape.back() = N;
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
  m.def("hptq_linear(Tensor x, Tensor blocks, Tensor offsets, Tensor scales, Tensor hi_rows, "
        "Tensor rows, Tensor cols, Tensor val, Tensor? bias, int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(babai_cpu, CPU, m) { m.impl("hptq_linear", &hptq_linear); }
