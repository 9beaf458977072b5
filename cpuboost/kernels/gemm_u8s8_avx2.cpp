// int8 linear layers (uint8 activations x int8 weights, int32 sums) for CPUs with AVX2 but
// neither AVX-512 nor VNNI: y = act((x_q - zp) W_q^T * x_scale * w_scale + b), returned as float32
// or quantized again to uint8 for the next int8 layer.
//
// Why: on the 2-core AVX2 Zen 3 this was written on, oneDNN's int8 inner product ran BERT-base's
// linears at 200-220 GOP/s (84% of the int8 model's time), against 125-139 GFLOP/s for fp32 in
// gemm_avx2.cpp: 1.6x, where the instructions allow 2x. Each call also paid Python-side passes
// to quantize its input (mul, round, add, clamp, cast: one op each).
//
// How: without VNNI, a u8 x s8 dot product of 4 values into an int32 lane takes two instructions:
// vpmaddubsw (pairs of products summed into int16) and vpmaddwd by ones (pairs of those into
// int32). The pair sum saturates int16 unless |w[2i]| + |w[2i+1]| (signs alike) <= 128, which
// the Python side guarantees by quantizing weights pair-bounded (``nn/int8.py``,
// ``pair_extent``): then 255 * 128 < 32767 and every sum is exact. The weight is packed once into
// panels of 16 output features, [N/16][K/4][16][4] bytes, zero padded in N and K, so that one
// 32-byte load holds 4 K values of 8 features, the layout the broadcast of 4 input bytes
// multiplies. As in gemm_avx2.cpp, a panel's K block (1024 values, 16 KB) stays in L1 while a
// block of up to 192 rows passes over it, 4 rows at a time (8 int32 accumulators + 2 weight
// vectors + broadcast + ones + products: 14 of the 16 ymm). The zero point is taken out in the
// last K block as zp * (column sum of W_q), then the scales, the bias and the activation are
// applied while the tile is in registers. A float input is quantized here in one pass (its range
// measured first when no scale is given: dynamic quantization). Integer sums are exact and each
// output is computed by one thread: results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include "act_avx2.h"
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using namespace cpuboost_avx2;

constexpr int NR = 16;         // output features per panel (two ymm of int32)
constexpr int MR = 4;          // rows per register tile
constexpr int64_t KG = 4;      // K values per int32 lane
constexpr int64_t KC = 1024;   // K block: a panel's block (16 KB of int8) stays in L1
constexpr int64_t MC = 192;    // rows per block: x's block (192 KB) stays in L2
constexpr int64_t kPanelStep = NR * KG;  // bytes of one K group of a panel
// |u8 x s8| <= 255 x 128 per product: 65536 of them (and the zero-point term) fit int32
constexpr int64_t kMaxK = 65536;

int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

// [N, K] int8 -> [ceil(N/16), ceil(K/4), 16, 4], zero padded.
at::Tensor pack_u8s8_weight(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar,
              "cpuboost::pack_u8s8_weight takes a 2-d int8 weight [out, in], got ",
              weight.scalar_type(), " of shape ", weight.sizes());
  const at::Tensor w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1), P = (N + NR - 1) / NR, G = (K + KG - 1) / KG;
  at::Tensor out = at::zeros({P, G, NR, KG}, w.options());
  const int8_t* src = w.data_ptr<int8_t>();
  int8_t* dst = out.data_ptr<int8_t>();
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t cols = std::min<int64_t>(NR, N - p * NR);
      for (int64_t j = 0; j < cols; ++j) {
        const int8_t* row = src + (p * NR + j) * K;
        int8_t* col = dst + p * G * kPanelStep + j * KG;
        for (int64_t k = 0; k < K; ++k) col[(k / KG) * kPanelStep + k % KG] = row[k];
      }
    }
  });
  return out;
}

// acc[0:M][0:16] += a[0:M, 0:4 kg] (uint8, rows lda bytes apart) @ the panel's K block (kg
// groups). Out of line so that the register allocator sees only this loop.
template <int M>
__attribute__((noinline)) void kloop(const uint8_t* a, int64_t lda, const int8_t* b, int64_t kg,
                                     int32_t* acc_mem) {
  __m256i acc[M][2];
#pragma GCC unroll 4
  for (int i = 0; i < M; ++i) {
    acc[i][0] = _mm256_load_si256(reinterpret_cast<const __m256i*>(acc_mem + i * NR));
    acc[i][1] = _mm256_load_si256(reinterpret_cast<const __m256i*>(acc_mem + i * NR + 8));
  }
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t g = 0; g < kg; ++g) {
    const int8_t* bg = b + g * kPanelStep;
    _mm_prefetch(reinterpret_cast<const char*>(bg) + 1024, _MM_HINT_T0);
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bg));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bg + 32));
#pragma GCC unroll 4
    for (int i = 0; i < M; ++i) {
      int32_t four;
      std::memcpy(&four, a + i * lda + g * KG, sizeof four);
      const __m256i x = _mm256_set1_epi32(four);
      acc[i][0] = _mm256_add_epi32(acc[i][0],
                                   _mm256_madd_epi16(_mm256_maddubs_epi16(x, w0), ones));
      acc[i][1] = _mm256_add_epi32(acc[i][1],
                                   _mm256_madd_epi16(_mm256_maddubs_epi16(x, w1), ones));
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < M; ++i) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(acc_mem + i * NR), acc[i][0]);
    _mm256_store_si256(reinterpret_cast<__m256i*>(acc_mem + i * NR + 8), acc[i][1]);
  }
}

using KLoop = void (*)(const uint8_t*, int64_t, const int8_t*, int64_t, int32_t*);
constexpr KLoop kLoops[MR + 1] = {nullptr, kloop<1>, kloop<2>, kloop<3>, kloop<4>};

// Per output feature, padded to whole panels: zp * colsum, x_scale * w_scale, bias.
struct Epilogue {
  const int32_t* offset;
  const float* scale;
  const float* bias;
  int64_t act;
  float out_inv;   // 1 / output scale; 0: float32 output
  float out_zp;
};

// rows of int32 sums (16 per row) -> float32 or uint8 outputs; c points at the tile's first
// output, rows ldc elements apart, nvalid of the 16 features kept.
void finish(const int32_t* acc, int rows, const Epilogue& e, int64_t p, void* c, int64_t ldc,
            int nvalid) {
  for (int i = 0; i < rows; ++i) {
    alignas(32) float y[NR];
    for (int h = 0; h < NR; h += 8) {
      const int64_t n = p * NR + h;
      const __m256i s = _mm256_sub_epi32(
          _mm256_load_si256(reinterpret_cast<const __m256i*>(acc + i * NR + h)),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(e.offset + n)));
      __m256 v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_loadu_ps(e.scale + n),
                                 _mm256_loadu_ps(e.bias + n));
      _mm256_store_ps(y + h, e.act == kNone ? v : activate(v, e.act));
    }
    if (e.out_inv == 0.0f) {
      float* row = static_cast<float*>(c) + i * ldc;
      if (nvalid == NR) {
        _mm256_storeu_ps(row, _mm256_load_ps(y));
        _mm256_storeu_ps(row + 8, _mm256_load_ps(y + 8));
      } else {
        std::memcpy(row, y, nvalid * sizeof(float));
      }
      continue;
    }
    // uint8 for the next layer: clamp(round(y / scale) + zp, 0, 255), as quantize_per_tensor
    const __m256 inv = _mm256_set1_ps(e.out_inv), zp = _mm256_set1_ps(e.out_zp);
    const __m256 lo = _mm256_setzero_ps(), hi = _mm256_set1_ps(255.0f);
    __m256i q[2];
    for (int h = 0; h < 2; ++h) {
      __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_load_ps(y + 8 * h), inv),
                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      q[h] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(_mm256_add_ps(v, zp), lo), hi));
    }
    const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xD8);
    const __m128i bytes = _mm_packus_epi16(_mm256_castsi256_si128(w),
                                           _mm256_extracti128_si256(w, 1));
    uint8_t* row = static_cast<uint8_t*>(c) + i * ldc;
    if (nvalid == NR) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(row), bytes);
    } else {
      alignas(16) uint8_t tmp[NR];
      _mm_store_si128(reinterpret_cast<__m128i*>(tmp), bytes);
      std::memcpy(row, tmp, nvalid);
    }
  }
}

void run(const uint8_t* a, int64_t lda, const int8_t* w, const Epilogue& e, void* c,
         int64_t elem, int64_t M, int64_t N, int64_t G) {
  const int64_t P = (N + NR - 1) / NR, threads = at::get_num_threads();
  int64_t mblocks = (M + MC - 1) / MC;
  if (mblocks >= threads) mblocks = (mblocks + threads - 1) / threads * threads;
  mblocks = std::min(mblocks, (M + MR - 1) / MR);
  const int64_t rows = round_up((M + mblocks - 1) / mblocks, MR);
  mblocks = (M + rows - 1) / rows;
  const int64_t nchunks = mblocks >= threads ? 1 : std::min(P, (threads + mblocks - 1) / mblocks);
  const int64_t per_chunk = (P + nchunks - 1) / nchunks, GC = KC / KG;
  at::parallel_for(0, mblocks * nchunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> buf(rows * NR + 8);  // the tile rows' int32 sums, 32-byte aligned
    int32_t* acc = reinterpret_cast<int32_t*>(round_up(reinterpret_cast<intptr_t>(buf.data()), 32));
    for (int64_t u = begin; u < end; ++u) {
      const int64_t m0 = (u / nchunks) * rows, m1 = std::min(M, m0 + rows);
      const int64_t p0 = (u % nchunks) * per_chunk, p1 = std::min(P, p0 + per_chunk);
      for (int64_t p = p0; p < p1; ++p) {
        const int nvalid = static_cast<int>(std::min<int64_t>(NR, N - p * NR));
        std::fill(acc, acc + (m1 - m0) * NR, 0);
        for (int64_t g0 = 0; g0 < G; g0 += GC) {
          const int64_t gc = std::min(GC, G - g0);
          const int8_t* panel = w + (p * G + g0) * kPanelStep;
          for (int64_t i = m0; i < m1; i += MR) {
            const int mr = static_cast<int>(std::min<int64_t>(MR, m1 - i));
            kLoops[mr](a + i * lda + g0 * KG, lda, panel, gc, acc + (i - m0) * NR);
          }
        }
        char* out = static_cast<char*>(c) + (m0 * N + p * NR) * elem;
        finish(acc, static_cast<int>(m1 - m0), e, p, out, N, nvalid);
      }
    }
  });
}

// src[0:n] (float32) quantized to uint8: clamp(round(x * inv) + zp, 0, qmax), the formula of
// nn/int8.py's _quantize (round half to even, as torch.round).
void quantize_span(const float* src, uint8_t* dst, int64_t n, float inv, int64_t zp, int64_t qmax) {
  const __m256 vinv = _mm256_set1_ps(inv), vzp = _mm256_set1_ps(static_cast<float>(zp));
  const __m256 lo = _mm256_setzero_ps(), hi = _mm256_set1_ps(static_cast<float>(qmax));
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(src + k), vinv),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256i i32 = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(_mm256_add_ps(v, vzp), lo), hi));
    __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + k), _mm_packus_epi16(i16, i16));
  }
  for (; k < n; ++k) {
    const float v = std::nearbyint(src[k] * inv) + static_cast<float>(zp);
    dst[k] = static_cast<uint8_t>(std::min(std::max(v, 0.0f), static_cast<float>(qmax)));
  }
}

// x ([M, K]) quantized to uint8 rows lda bytes apart, the padding zero
void quantize_rows(const float* x, int64_t M, int64_t K, float inv, int64_t zp, int64_t qmax,
                   uint8_t* q, int64_t lda) {
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / K), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      quantize_span(x + m * K, q + m * lda, K, inv, zp, qmax);
      std::memset(q + m * lda + K, 0, lda - K);
    }
  });
}

// A float32 tensor of any shape quantized to uint8 on (scale, zp), in x's memory format
// (channels-last stays channels-last): one pass instead of torch's mul, round, add, clamp, cast.
at::Tensor quantize_u8(const at::Tensor& input, double scale, int64_t zp, int64_t qmax) {
  TORCH_CHECK(input.scalar_type() == at::kFloat, "cpuboost::quantize_u8 takes float32, got ",
              input.scalar_type());
  TORCH_CHECK(scale > 0 && qmax > 0 && qmax <= 255 && zp >= 0 && zp <= qmax,
              "cpuboost::quantize_u8: scale ", scale, " and zero point ", zp,
              " must be positive and within 0..", qmax);
  const at::Tensor x = input.is_non_overlapping_and_dense() ? input : input.contiguous();
  at::Tensor q = at::empty_like(x, x.options().dtype(at::kByte));
  TORCH_CHECK(q.strides() == x.strides(), "cpuboost::quantize_u8: unexpected strides");
  const float* src = x.data_ptr<float>();
  uint8_t* dst = q.data_ptr<uint8_t>();
  const float inv = static_cast<float>(1.0 / scale);
  at::parallel_for(0, x.numel(), 16384, [&](int64_t begin, int64_t end) {
    quantize_span(src + begin, dst + begin, end - begin, inv, zp, qmax);
  });
  return q;
}

// x_scale > 0: x's qparams (or those of a uint8 x). x_scale <= 0 (float x only): measured here
// from x's range and 0, as nn/int8.py's dynamic_qparams does (in double, rounding half to even).
// out_scale > 0: uint8 output on (out_scale, out_zp); else float32.
at::Tensor linear_u8s8(const at::Tensor& input, const at::Tensor& packed, const at::Tensor& w_scale,
                       const at::Tensor& colsum, const std::optional<at::Tensor>& bias,
                       int64_t out_features, int64_t act, double x_scale, int64_t x_zp,
                       int64_t qmax, double out_scale, int64_t out_zp) {
  const char* op = "cpuboost::linear_u8s8";
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kByte, op,
              " takes a float32 or uint8 input, got ", input.scalar_type());
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.dim() == 4 && packed.size(2) == NR &&
              packed.size(3) == KG && packed.is_contiguous(),
              op, ": the weight was not packed by cpuboost::pack_u8s8_weight");
  const int64_t P = packed.size(0), G = packed.size(1), N = out_features;
  TORCH_CHECK(input.dim() >= 1, op, ": a 0-d input");
  const int64_t K = input.size(-1);
  TORCH_CHECK(K > 0 && (K + KG - 1) / KG == G, op, ": input has ", K,
              " features, the weight expects ", G * KG - 3, " to ", G * KG);
  TORCH_CHECK(N > (P - 1) * NR && N <= P * NR, op, ": ", N,
              " output features do not fit a packed weight of ", P, " panels");
  TORCH_CHECK(K <= kMaxK, op, ": ", K, " input features could overflow the int32 sums (at most ",
              kMaxK, ")");
  TORCH_CHECK(act >= kNone && act < kActs, op, ": unknown activation ", act);
  TORCH_CHECK(qmax > 0 && qmax <= 255 && x_zp >= 0 && x_zp <= qmax, op, ": input zero point ",
              x_zp, " outside 0..", qmax);
  TORCH_CHECK(out_scale <= 0 || (out_zp >= 0 && out_zp <= 255), op, ": output zero point ",
              out_zp, " outside 0..255");
  TORCH_CHECK(w_scale.numel() == N && w_scale.scalar_type() == at::kFloat &&
              colsum.numel() == N && colsum.scalar_type() == at::kInt,
              op, ": need float32 weight scales and int32 column sums, one per output feature");
  const at::Tensor x = input.contiguous();
  const int64_t M = x.numel() / K;
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape.back() = N;
  const bool quantized_out = out_scale > 0;
  at::Tensor out = at::empty(shape, x.options().dtype(quantized_out ? at::kByte : at::kFloat));
  if (M == 0) return out;

  // the input as uint8 rows, 4-byte padded
  const int64_t lda = G * KG;
  const uint8_t* a = nullptr;
  at::Tensor qx;
  if (x.scalar_type() == at::kFloat) {
    if (x_scale <= 0) {
      auto [lo_t, hi_t] = at::aminmax(x);  // NaN anywhere makes both NaN
      const double lo = std::min(lo_t.item<double>(), 0.0), hi = std::max(hi_t.item<double>(), 0.0);
      TORCH_CHECK(std::isfinite(lo) && std::isfinite(hi), op, ": the input holds inf or NaN "
                  "(range ", lo_t.item<double>(), " to ", hi_t.item<double>(), "); dynamic "
                  "quantization needs a finite range");
      x_scale = std::max((hi - lo) / static_cast<double>(qmax), static_cast<double>(FLT_EPSILON));
      x_zp = static_cast<int64_t>(std::min(std::max(std::nearbyint(-lo / x_scale), 0.0),
                                           static_cast<double>(qmax)));
    }
    qx = at::empty({M, lda}, x.options().dtype(at::kByte));
    quantize_rows(x.data_ptr<float>(), M, K, static_cast<float>(1.0 / x_scale), x_zp, qmax,
                  qx.data_ptr<uint8_t>(), lda);
    a = qx.data_ptr<uint8_t>();
  } else if (K % KG) {
    qx = at::zeros({M, lda}, x.options());
    qx.narrow(1, 0, K).copy_(x.reshape({M, K}));
    a = qx.data_ptr<uint8_t>();
  } else {
    a = x.data_ptr<uint8_t>();
  }

  // per-feature epilogue constants, padded to whole panels
  at::Tensor consts = at::zeros({3, P * NR}, x.options().dtype(at::kFloat));
  int32_t* offset = reinterpret_cast<int32_t*>(consts[0].data_ptr<float>());
  float* scale = consts[1].data_ptr<float>();
  float* b = consts[2].data_ptr<float>();
  const at::Tensor ws = w_scale.contiguous(), cs = colsum.contiguous();
  const float* wsp = ws.data_ptr<float>();
  const int32_t* csp = cs.data_ptr<int32_t>();
  const float xs = static_cast<float>(x_scale);
  for (int64_t n = 0; n < N; ++n) {
    offset[n] = static_cast<int32_t>(x_zp) * csp[n];
    scale[n] = xs * wsp[n];
  }
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N && bias->scalar_type() == at::kFloat,
                op, ": bias must be float32 with ", N, " values");
    std::memcpy(b, bias->contiguous().data_ptr<float>(), N * sizeof(float));
  }
  const Epilogue e{offset, scale, b, act,
                   quantized_out ? static_cast<float>(1.0 / out_scale) : 0.0f,
                   static_cast<float>(out_zp)};
  run(a, lda, packed.data_ptr<int8_t>(), e, out.data_ptr(), quantized_out ? 1 : 4, M, N, G);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cpuboost, m) {
  m.def("pack_u8s8_weight(Tensor weight) -> Tensor");
  m.def("quantize_u8(Tensor input, float scale, int zp, int qmax) -> Tensor");
  m.def("linear_u8s8(Tensor input, Tensor packed, Tensor w_scale, Tensor colsum, Tensor? bias, "
        "int out_features, int act, float x_scale, int x_zp, int qmax, float out_scale, "
        "int out_zp) -> Tensor");
}

TORCH_LIBRARY_IMPL(cpuboost, CPU, m) {
  m.impl("pack_u8s8_weight", &pack_u8s8_weight);
  m.impl("quantize_u8", &quantize_u8);
  m.impl("linear_u8s8", &linear_u8s8);
}
