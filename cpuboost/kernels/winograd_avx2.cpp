// fp32 3x3 convolutions, stride 1, by Winograd's F(4x4, 3x3), for CPUs with AVX2 and FMA but no
// AVX-512 (``cpuboost::conv3x3_winograd``).
//
// Why: on the 2-core AVX2 Zen 3 this was written on, oneDNN's direct convolution already ran
// ResNet-50's 3x3 layers at 140-165 GFLOP/s, near the FMA peak (~190); half of ResNet-50's time
// is those layers. Winograd's F(4x4, 3x3) computes a 4x4 output tile from a 6x6 input tile with
// 36 multiplications per input/output channel pair instead of 144: a quarter of the arithmetic,
// paid for with transforms that are linear in the data (adds and a few multiplies by small
// constants) and with the weight held 4x larger (36 values per 3x3 kernel).
//
// How, for each block of tiles (a tile is 4x4 output pixels; the input is NHWC):
//  1. input transform: each 6x6 input patch d (zero outside the padded image) becomes
//     V = B^T d B, 36 values per channel, stored as 36 matrices [tiles][in channels];
//  2. 36 GEMMs, M[k] = V[k] @ U[k], with U = G g G^T the transformed weight, packed once
//     (``winograd_pack`` in cpuboost.kernels) as 36 weights in the panels of the fp32 linear
//     kernel (gemm_tile_avx2.h), the same register tiles;
//  3. output transform: Y = A^T M A per tile and output channel, then bias, an added tensor
//     (a residual), the activation, in registers, stored into the NHWC output.
// Threads (torch's pool) split the tiles in steps 1 and 3 and the 36 x (output panels) GEMM
// items in step 2; every value is computed by one thread in a fixed order, so results do not
// depend on the thread count. Channels are taken 8 at a time (one ymm): both channel counts must
// be multiples of 8. The transforms are exact in real arithmetic; in float32 their rounding
// gives errors of ~1e-6 of the output's magnitude (the constants are at most 8; tests bound it).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include "gemm_tile_avx2.h"

namespace {

using namespace cpuboost_gemm_avx2;

constexpr int64_t kPoints = 36;  // 6x6 transform points per tile

// B^T applied to one 6-vector (of 8 channels each)
inline void input_1d(const __m256 d[6], __m256 t[6]) {
  const __m256 two = _mm256_set1_ps(2.f), four = _mm256_set1_ps(4.f), five = _mm256_set1_ps(5.f);
  const __m256 a = _mm256_sub_ps(d[4], d[2]), b = _mm256_sub_ps(d[3], d[1]);
  const __m256 c = _mm256_add_ps(d[3], d[4]), e = _mm256_add_ps(d[1], d[2]);
  const __m256 f = _mm256_sub_ps(d[4], d[3]), g = _mm256_sub_ps(d[1], d[2]);
  t[0] = _mm256_fmadd_ps(four, d[0], _mm256_fnmadd_ps(five, d[2], d[4]));
  t[1] = _mm256_fnmadd_ps(four, e, c);
  t[2] = _mm256_fmadd_ps(four, g, f);
  t[3] = _mm256_fmadd_ps(two, b, a);
  t[4] = _mm256_fnmadd_ps(two, b, a);
  t[5] = _mm256_fmadd_ps(four, d[1], _mm256_fnmadd_ps(five, d[3], d[5]));
}

// A^T applied to one 6-vector
inline void output_1d(const __m256 m[6], __m256 o[4]) {
  const __m256 s12 = _mm256_add_ps(m[1], m[2]), d12 = _mm256_sub_ps(m[1], m[2]);
  const __m256 s34 = _mm256_add_ps(m[3], m[4]), d34 = _mm256_sub_ps(m[3], m[4]);
  o[0] = _mm256_add_ps(_mm256_add_ps(m[0], s12), s34);
  o[1] = _mm256_fmadd_ps(_mm256_set1_ps(2.f), d34, d12);
  o[2] = _mm256_fmadd_ps(_mm256_set1_ps(4.f), s34, s12);
  o[3] = _mm256_add_ps(_mm256_fmadd_ps(_mm256_set1_ps(8.f), d34, d12), m[5]);
}

struct Geometry {
  int64_t H, W, C, OH, OW, OC, ph, pw, tiles_h, tiles_w;
  // tile t -> (image, first output row, first output column)
  void locate(int64_t t, int64_t& n, int64_t& oy, int64_t& ox) const {
    n = t / (tiles_h * tiles_w);
    const int64_t r = t % (tiles_h * tiles_w);
    oy = (r / tiles_w) * 4;
    ox = (r % tiles_w) * 4;
  }
};

// Step 1 for tiles [t0, t1): v[k][t - t0][c] for the 36 points k.
void input_transform(const float* x, float* v, const Geometry& g, int64_t t0, int64_t t1,
                     int64_t tb) {
  const int64_t C = g.C;
  at::parallel_for(t0, t1, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      int64_t n, oy, ox;
      g.locate(t, n, oy, ox);
      const int64_t iy0 = oy - g.ph, ix0 = ox - g.pw;
      const float* img = x + n * g.H * g.W * C;
      bool inside[6][6];
      for (int r = 0; r < 6; ++r)
        for (int s = 0; s < 6; ++s)
          inside[r][s] = iy0 + r >= 0 && iy0 + r < g.H && ix0 + s >= 0 && ix0 + s < g.W;
      float* out = v + (t - t0) * C;
      for (int64_t c = 0; c < C; c += 8) {
        __m256 d[6][6], col[6], tc[6], rows[6][6];
        for (int r = 0; r < 6; ++r)
          for (int s = 0; s < 6; ++s)
            d[r][s] = inside[r][s]
                ? _mm256_loadu_ps(img + ((iy0 + r) * g.W + ix0 + s) * C + c)
                : _mm256_setzero_ps();
        for (int s = 0; s < 6; ++s) {  // B^T d: down each column
          for (int r = 0; r < 6; ++r) col[r] = d[r][s];
          input_1d(col, tc);
          for (int r = 0; r < 6; ++r) rows[r][s] = tc[r];
        }
        for (int r = 0; r < 6; ++r) {  // (B^T d) B: along each row
          __m256 res[6];
          input_1d(rows[r], res);
          for (int s = 0; s < 6; ++s)
            _mm256_storeu_ps(out + (r * 6 + s) * tb * C + c, res[s]);
        }
      }
    }
  });
}

// Step 3 for tiles [t0, t1): y = A^T m A, + bias, + add, activation.
void output_transform(const float* m, float* y, const float* bias, const float* add,
                      const Geometry& g, int64_t t0, int64_t t1, int64_t tb, int64_t act) {
  const int64_t OC = g.OC;
  at::parallel_for(t0, t1, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      int64_t n, oy, ox;
      g.locate(t, n, oy, ox);
      const int rows = static_cast<int>(std::min<int64_t>(4, g.OH - oy));
      const int cols = static_cast<int>(std::min<int64_t>(4, g.OW - ox));
      const float* in = m + (t - t0) * OC;
      const int64_t base = ((n * g.OH + oy) * g.OW + ox) * OC;
      for (int64_t c = 0; c < OC; c += 8) {
        __m256 cols6[6][4];  // A^T m: 4 rows, for each of the 6 columns
        for (int s = 0; s < 6; ++s) {
          __m256 col[6], o[4];
          for (int r = 0; r < 6; ++r) col[r] = _mm256_loadu_ps(in + (r * 6 + s) * tb * OC + c);
          output_1d(col, o);
          for (int r = 0; r < 4; ++r) cols6[s][r] = o[r];
        }
        const __m256 b = bias ? _mm256_loadu_ps(bias + c) : _mm256_setzero_ps();
        for (int r = 0; r < rows; ++r) {
          __m256 row[6], o[4];
          for (int s = 0; s < 6; ++s) row[s] = cols6[s][r];
          output_1d(row, o);
          for (int s = 0; s < cols; ++s) {
            const int64_t at = base + (r * g.OW + s) * OC + c;
            __m256 val = _mm256_add_ps(o[s], b);
            if (add) val = _mm256_add_ps(val, _mm256_loadu_ps(add + at));
            if (act != kNone) val = activate(val, act);
            _mm256_storeu_ps(y + at, val);
          }
        }
      }
    }
  });
}

// Step 2 for a block of `rows` tiles (tb apart): m[k] = v[k] @ U[k] for the 36 points.
void transformed_gemms(const float* v, const float* u, float* m, int64_t rows, int64_t tb,
                       int64_t C, int64_t OC) {
  const int64_t P = (OC + NR - 1) / NR;
  at::parallel_for(0, kPoints * P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end;) {  // consecutive items of one point: one call
      const int64_t k = item / P, p0 = item % P;
      const int64_t p1 = std::min(P, p0 + (end - item));
      gemm_rows(v + k * tb * C, C, u + k * P * C * NR, m + k * tb * OC, OC, nullptr, nullptr,
                0, rows, OC, C, p0, p1, kNone);
      item += p1 - p0;
    }
  });
}

// The transformed tiles, kept per calling thread between calls: allocated anew each call, these
// few MB came back from the kernel as fresh pages often enough to double a 56x56 layer's time
// (0.56 vs 1.9-2.3 ms, one process).
float* workspace(int64_t floats) {
  thread_local at::Tensor buffer;
  if (!buffer.defined() || buffer.numel() < floats) buffer = at::empty({floats}, at::kFloat);
  return buffer.data_ptr<float>();
}

at::Tensor conv3x3_winograd(const at::Tensor& input, const at::Tensor& packed,
                            const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& add, int64_t out_channels,
                            at::IntArrayRef padding, int64_t act) {
  const char* op = "cpuboost::conv3x3_winograd";
  TORCH_CHECK(input.dim() == 4 && input.scalar_type() == at::kFloat, op,
              " takes a 4-d float32 input (N, C, H, W), got ", input.scalar_type(), " of shape ",
              input.sizes());
  TORCH_CHECK(packed.dim() == 4 && packed.size(0) == kPoints && packed.size(3) == NR &&
              packed.scalar_type() == at::kFloat && packed.is_contiguous(), op,
              ": the weight was not packed by cpuboost.kernels.winograd_pack");
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t OC = out_channels, P = packed.size(1);
  TORCH_CHECK(packed.size(2) == C, op, ": input has ", C, " channels, the weight expects ",
              packed.size(2));
  TORCH_CHECK(C % 8 == 0 && OC % 8 == 0 && C > 0 && OC > (P - 1) * NR && OC <= P * NR, op,
              ": channel counts must be positive multiples of 8 that fit the packed weight, got ",
              C, " in, ", OC, " out");
  TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[0] <= 2 && padding[1] >= 0 &&
              padding[1] <= 2, op, ": padding must be two values in 0..2, got ", padding);
  TORCH_CHECK(act >= kNone && act < kActs, op, ": unknown activation ", act);
  Geometry g{H, W, C, H + 2 * padding[0] - 2, W + 2 * padding[1] - 2, OC, padding[0],
             padding[1], 0, 0};
  TORCH_CHECK(g.OH > 0 && g.OW > 0, op, ": a ", H, "x", W, " input with padding ", padding,
              " leaves no output");
  g.tiles_h = (g.OH + 3) / 4;
  g.tiles_w = (g.OW + 3) / 4;
  const at::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor out = at::empty({N, OC, g.OH, g.OW},
                             input.options().memory_format(at::MemoryFormat::ChannelsLast));
  const float* bias_ptr = nullptr;
  at::Tensor b, a;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == OC && bias->scalar_type() == at::kFloat, op,
                ": bias must be float32 with ", OC, " values");
    b = bias->contiguous();
    bias_ptr = b.data_ptr<float>();
  }
  const float* add_ptr = nullptr;
  if (add.has_value() && add->defined()) {
    TORCH_CHECK(add->sizes() == out.sizes() && add->scalar_type() == at::kFloat, op,
                ": the added tensor must be float32 of the output's shape ", out.sizes(),
                ", got ", add->scalar_type(), " ", add->sizes());
    a = add->contiguous(at::MemoryFormat::ChannelsLast);
    add_ptr = a.data_ptr<float>();
  }
  if (N == 0) return out;
  // tiles in blocks whose transformed data (36 values per channel, in and out) fits ~4 MB
  const int64_t T = N * g.tiles_h * g.tiles_w;
  const int64_t per_tile = kPoints * (C + OC) * 4;
  const int64_t tb = std::min(T, std::max<int64_t>(2 * MR, (4 << 20) / per_tile));
  float* v = workspace(kPoints * tb * (C + OC));
  float* m = v + kPoints * tb * C;
  for (int64_t t0 = 0; t0 < T; t0 += tb) {
    const int64_t t1 = std::min(T, t0 + tb);
    input_transform(x.data_ptr<float>(), v, g, t0, t1, tb);
    transformed_gemms(v, packed.data_ptr<float>(), m, t1 - t0, tb, C, OC);
    output_transform(m, out.data_ptr<float>(), bias_ptr, add_ptr, g, t0, t1, tb, act);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cpuboost, m) {
  m.def("conv3x3_winograd(Tensor input, Tensor packed, Tensor? bias, Tensor? add, "
        "int out_channels, int[] padding, int act) -> Tensor");
}

TORCH_LIBRARY_IMPL(cpuboost, CPU, m) {
  m.impl("conv3x3_winograd", &conv3x3_winograd);
}
