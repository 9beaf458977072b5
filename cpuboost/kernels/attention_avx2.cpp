// fp32 scaled dot-product attention for the short sequences of encoder models, on CPUs with AVX2
// and FMA but no AVX-512 (``cpuboost::attention_f32``): softmax(Q K^T s + mask) V.
//
// Why: torch's CPU flash attention ran BERT-base's 12 heads of 64 at length 128 in ~1 ms per
// layer inside the int8 model on the 2-core AVX2 Zen 3 (~50 GFLOP/s), 10% of its forward.
// How: per (batch, head), K is packed once into the fp32 linear kernel's panels of 16 keys
// ([Lk/16][D][16]) and V^T into panels of 16 head features ([D/16][Lk][16]); then for each
// block of query rows, S = (Q s) K^T and O = P V run on that kernel's register tiles
// (gemm_tile_avx2.h), with the masked softmax in fp32 between them. Threads split the (batch,
// head) pairs; every value is computed by one thread in a fixed order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include "gemm_tile_avx2.h"
#include <limits>
#include <vector>

namespace {

using namespace cpuboost_gemm_avx2;

constexpr int64_t kRows = 48;  // query rows per block: S is 48 x Lk floats

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// row s[0:n] (+ mask row, elements mk apart) -> exp(s - max) in place; returns 1 / sum, or 0
// when every key is masked out (the row's output is then zeros)
float softmax_row(float* s, int64_t n, const float* mask, int64_t mk) {
  const float ninf = -std::numeric_limits<float>::infinity();
  if (mask) {
    for (int64_t i = 0; i < n; ++i) s[i] += mask[i * mk];
  }
  __m256 vmax = _mm256_set1_ps(ninf);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(s + i));
  float mx = hmax(vmax);
  for (; i < n; ++i) mx = std::max(mx, s[i]);
  if (mx == ninf) {
    for (i = 0; i < n; ++i) s[i] = 0.f;
    return 0.f;
  }
  const __m256 vm = _mm256_set1_ps(mx);
  __m256 vsum = _mm256_setzero_ps();
  for (i = 0; i + 8 <= n; i += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + i), vm));
    _mm256_storeu_ps(s + i, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  float sum = hsum(vsum);
  for (; i < n; ++i) {
    alignas(32) float one[8] = {s[i] - mx};
    const float e = _mm256_cvtss_f32(exp256(_mm256_load_ps(one)));
    s[i] = e;
    sum += e;
  }
  return 1.f / sum;
}

void attention_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor* mask, float scale, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3), Lk = k.size(2);
  const int64_t PK = (Lk + NR - 1) / NR, PD = (D + NR - 1) / NR;
  const float* qd = q.data_ptr<float>();
  const float* kd = k.data_ptr<float>();
  const float* vd = v.data_ptr<float>();
  float* od = out.data_ptr<float>();
  const auto qs = q.strides(), ks = k.strides(), vs = v.strides(), os = out.strides();
  const float* md = mask ? mask->data_ptr<float>() : nullptr;
  int64_t mB = 0, mH = 0, mQ = 0, mK = 1;
  if (mask) {
    mB = mask->size(0) == 1 ? 0 : mask->stride(0);
    mH = mask->size(1) == 1 ? 0 : mask->stride(1);
    mQ = mask->size(2) == 1 ? 0 : mask->stride(2);
    mK = mask->stride(3);
  }
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kp(PK * D * NR, 0.f), vp(PD * Lk * NR, 0.f);
    std::vector<float> qb(kRows * D), sb(kRows * Lk), ob(kRows * D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const float* kb = kd + b * ks[0] + h * ks[1];
      const float* vb = vd + b * vs[0] + h * vs[1];
      for (int64_t n = 0; n < Lk; ++n) {  // K: key n is column n % 16 of panel n / 16
        float* col = kp.data() + (n / NR) * D * NR + n % NR;
        const float* row = kb + n * ks[2];
        for (int64_t d = 0; d < D; ++d) col[d * NR] = row[d];
      }
      for (int64_t n = 0; n < Lk; ++n) {  // V^T: feature d is column d % 16 of panel d / 16
        const float* row = vb + n * vs[2];
        for (int64_t d = 0; d < D; ++d) vp[((d / NR) * Lk + n) * NR + d % NR] = row[d];
      }
      const float* qh = qd + b * qs[0] + h * qs[1];
      for (int64_t m0 = 0; m0 < Lq; m0 += kRows) {
        const int64_t rows = std::min(kRows, Lq - m0);
        for (int64_t r = 0; r < rows; ++r) {
          const float* src = qh + (m0 + r) * qs[2];
          for (int64_t d = 0; d < D; ++d) qb[r * D + d] = src[d] * scale;
        }
        gemm_rows(qb.data(), D, kp.data(), sb.data(), Lk, nullptr, nullptr, 0, rows, Lk, D, 0,
                  PK, kNone);
        float inv[kRows];
        for (int64_t r = 0; r < rows; ++r) {
          const float* mr = md ? md + b * mB + h * mH + (m0 + r) * mQ : nullptr;
          inv[r] = softmax_row(sb.data() + r * Lk, Lk, mr, mK);
        }
        gemm_rows(sb.data(), Lk, vp.data(), ob.data(), D, nullptr, nullptr, 0, rows, D, Lk, 0,
                  PD, kNone);
        for (int64_t r = 0; r < rows; ++r) {
          float* o = od + b * os[0] + h * os[1] + (m0 + r) * os[2];
          const __m256 s = _mm256_set1_ps(inv[r]);
          int64_t d = 0;
          for (; d + 8 <= D; d += 8)
            _mm256_storeu_ps(o + d, _mm256_mul_ps(_mm256_loadu_ps(ob.data() + r * D + d), s));
          for (; d < D; ++d) o[d] = ob[r * D + d] * inv[r];
        }
      }
    }
  });
}

at::Tensor attention_f32(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const std::optional<at::Tensor>& mask, double scale) {
  const char* op = "cpuboost::attention_f32";
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, ": 4-d q, k, v [B, H, L, D]");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat &&
              v.scalar_type() == at::kFloat, op, ": float32 q, k, v");
  const int64_t D = q.size(3);
  TORCH_CHECK(D > 0 && k.size(0) == q.size(0) && v.size(0) == q.size(0) &&
              k.size(1) == q.size(1) && v.size(1) == q.size(1) && k.size(3) == D &&
              v.size(3) == D && v.size(2) == k.size(2) && k.size(2) > 0, op, ": q ", q.sizes(),
              ", k ", k.sizes(), ", v ", v.sizes(), " do not match");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, op,
              ": the head dim must be contiguous");
  at::Tensor out = at::empty({q.size(0), q.size(2), q.size(1), D}, q.options()).transpose(1, 2);
  at::Tensor m;
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->dim() == 4 && (mask->size(0) == 1 || mask->size(0) == q.size(0)) &&
                (mask->size(1) == 1 || mask->size(1) == q.size(1)) &&
                (mask->size(2) == 1 || mask->size(2) == q.size(2)) &&
                mask->size(3) == k.size(2), op, ": mask ", mask->sizes(),
                " does not broadcast to the scores [", q.size(0), ", ", q.size(1), ", ",
                q.size(2), ", ", k.size(2), "]");
    m = mask->scalar_type() == at::kBool
        ? at::where(*mask, 0.0f, -std::numeric_limits<float>::infinity())
        : mask->to(at::kFloat);
  }
  if (out.numel() == 0) return out;
  attention_kernel(q, k, v, m.defined() ? &m : nullptr, static_cast<float>(scale), out);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cpuboost, m) {
  m.def("attention_f32(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(cpuboost, CPU, m) {
  m.impl("attention_f32", &attention_f32);
}
