// Scaled dot-product attention for inference on CPUs with AVX512-BF16: softmax(Q K^T s + mask) V
// for the short sequences of encoder models (BERT-base: 12 heads of 64, lengths up to 512).
//
// Why: torch's CPU SDPA kernels ran BERT's shapes at 30-130 GFLOP/s on the 2-core Zen 4 this
// was written on (flash bf16 at length 128: 490 us for 12 heads; the bf16 peak is ~440
// GFLOP/s), about 13% of a bf16 BERT-base forward. Per (batch, head): K and V are converted to
// bf16 pairs once (the layout vdpbf16ps reads), then for every 4 query rows Q K^T, the masked
// softmax in fp32, and P V run from registers. Inputs fp32 or bf16 (computed in bf16 with fp32
// accumulation either way); the mask is additive (fp32/bf16, broadcast over any dim) or bool.
// Output layout [B, L, H, D] seen as [B, H, L, D], as torch's flash attention returns it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include "exp2_poly.h"
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// e^x = 2^(x log2 e): 2^fraction by its Taylor series to degree 6 (relative error < 2e-7 on
// [-0.5, 0.5]) scaled by 2^integer; inputs below -87 (e^-87 ~ 1.6e-38) are clamped.
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(kLog2E));
  __m512 fi = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_sub_ps(t, fi);
  __m512 p = _mm512_set1_ps(kExp2Poly[0]);
#pragma GCC unroll 6
  for (int i = 1; i < 7; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly[i]));
  return _mm512_scalef_ps(p, fi);
}

// 16 values of a row (fp32 or bf16) as fp32
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16_masked(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16_masked(const at::BFloat16* p, __mmask16 m) {
  __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
// 32 values -> 32 bf16 in one zmm (a: first 16, b: next 16)
inline __m512i to_bf16x32(__m512 a, __m512 b) { return (__m512i)_mm512_cvtne2ps_pbh(b, a); }

// D columns of a row (D multiple of 32), scaled, into bf16 at dst
template <typename T>
inline void row_to_bf16(const T* src, int64_t D, float scale, uint16_t* dst) {
  __m512 s = _mm512_set1_ps(scale);
  for (int64_t d = 0; d < D; d += 32) {
    __m512i v = to_bf16x32(_mm512_mul_ps(load16(src + d), s), _mm512_mul_ps(load16(src + d + 16), s));
    _mm512_storeu_si512(dst + d, v);
  }
}

// S[r][n] = sum_d Q[r][d] K[n][d] for R rows, NB*16 columns starting at n0.
// Qb: [R][D] bf16, Kp: [D/2][Lkp][2] bf16 (VNNI)
template <int R, int NB>
inline void qk_block(const uint16_t* Qb, int64_t D, const uint16_t* Kp, int64_t Lkp, int64_t n0, float* S, int64_t ldS) {
  __m512 acc[R][NB];
  for (int r = 0; r < R; ++r) for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t dp = 0; dp < D / 2; ++dp) {
    __m512bh b[NB];
    for (int j = 0; j < NB; ++j) b[j] = (__m512bh)_mm512_loadu_si512(Kp + (dp * Lkp + n0 + 16 * j) * 2);
    for (int r = 0; r < R; ++r) {
      uint32_t pair; std::memcpy(&pair, Qb + r * D + 2 * dp, 4);
      __m512bh a = (__m512bh)_mm512_set1_epi32((int)pair);
      for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], a, b[j]);
    }
  }
  for (int r = 0; r < R; ++r) for (int j = 0; j < NB; ++j) _mm512_storeu_ps(S + r * ldS + n0 + 16 * j, acc[r][j]);
}

// O[r][0:ND*16] = sum_k P[r][k] V[k][:], P: [R][Lkp] bf16, Vp: [Lkp/2][D][2]
template <int R, int ND>
inline void pv_block(const uint16_t* P, int64_t Lkp, const uint16_t* Vp, int64_t D, float* O) {
  __m512 acc[R][ND];
  for (int r = 0; r < R; ++r) for (int j = 0; j < ND; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < Lkp / 2; ++kp) {
    __m512bh b[ND];
    for (int j = 0; j < ND; ++j) b[j] = (__m512bh)_mm512_loadu_si512(Vp + (kp * D + 16 * j) * 2);
    for (int r = 0; r < R; ++r) {
      uint32_t pair; std::memcpy(&pair, P + r * Lkp + 2 * kp, 4);
      __m512bh a = (__m512bh)_mm512_set1_epi32((int)pair);
      for (int j = 0; j < ND; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], a, b[j]);
    }
  }
  for (int r = 0; r < R; ++r) for (int j = 0; j < ND; ++j) _mm512_storeu_ps(O + r * D + 16 * j, acc[r][j]);
}

inline void store_scaled(const float* src, int64_t D, float s, float* o) {
  const __m512 vs = _mm512_set1_ps(s);
  for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(o + d, _mm512_mul_ps(_mm512_loadu_ps(src + d), vs));
}
inline void store_scaled(const float* src, int64_t D, float s, at::BFloat16* o) {
  const __m512 vs = _mm512_set1_ps(s);
  for (int64_t d = 0; d < D; d += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + d), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(src + d), vs)));
}

template <int R>
void qk_rows(const uint16_t* Qb, int64_t D, const uint16_t* Kp, int64_t Lkp, float* S) {
  int64_t n0 = 0;
  for (; n0 + 64 <= Lkp; n0 += 64) qk_block<R, 4>(Qb, D, Kp, Lkp, n0, S, Lkp);
  switch ((Lkp - n0) / 16) {
    case 3: qk_block<R, 3>(Qb, D, Kp, Lkp, n0, S, Lkp); break;
    case 2: qk_block<R, 2>(Qb, D, Kp, Lkp, n0, S, Lkp); break;
    case 1: qk_block<R, 1>(Qb, D, Kp, Lkp, n0, S, Lkp); break;
    default: break;
  }
}

template <int R>
void pv_rows(const uint16_t* P, int64_t Lkp, const uint16_t* Vp, int64_t D, float* O) {
  switch (D / 16) {
    case 2: pv_block<R, 2>(P, Lkp, Vp, D, O); break;
    case 4: pv_block<R, 4>(P, Lkp, Vp, D, O); break;
    case 8: pv_block<R < 2 ? R : 2, 8>(P, Lkp, Vp, D, O);
            if (R > 2) pv_block<R - 2 < 1 ? 1 : R - 2, 8>(P + 2 * Lkp, Lkp, Vp, D, O + 2 * D);
            break;
  }
}

template <typename T, typename M>
void attention_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const std::optional<at::Tensor>& mask, double scale, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3), Lk = k.size(2);
  const int64_t Lkp = (Lk + 15) / 16 * 16;
  const T* qd = q.data_ptr<T>(); const T* kd = k.data_ptr<T>(); const T* vd = v.data_ptr<T>();
  T* od = out.data_ptr<T>();
  auto qs = q.strides(); auto ks = k.strides(); auto vs = v.strides(); auto os = out.strides();
  const M* md = nullptr; int64_t mB = 0, mH = 0, mQ = 0, mK = 1;
  if (mask) {
    md = mask->data_ptr<M>();
    mB = mask->size(0) == 1 ? 0 : mask->stride(0); mH = mask->size(1) == 1 ? 0 : mask->stride(1);
    mQ = mask->size(2) == 1 ? 0 : mask->stride(2); mK = mask->stride(3);
  }
  const float sc = (float)scale;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint16_t> Kp(D * Lkp), Vp(Lkp * D), Qb(4 * D), P(4 * Lkp), row(D * 2);
    std::vector<float> S(4 * Lkp), O(4 * D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const T* kb = kd + b * ks[0] + h * ks[1];
      const T* vb = vd + b * vs[0] + h * vs[1];
      // pack K: Kp[dp][n][2]
      for (int64_t n = 0; n < Lkp; ++n) {
        if (n < Lk) row_to_bf16(kb + n * ks[2], D, 1.0f, row.data());
        else std::memset(row.data(), 0, D * 2);
        const uint32_t* r32 = reinterpret_cast<const uint32_t*>(row.data());
        uint32_t* k32 = reinterpret_cast<uint32_t*>(Kp.data());
        for (int64_t dp = 0; dp < D / 2; ++dp) k32[dp * Lkp + n] = r32[dp];
      }
      // pack V: Vp[kp][d][2]
      const __m512i lo = _mm512_set_epi16(47,15,46,14,45,13,44,12,43,11,42,10,41,9,40,8,39,7,38,6,37,5,36,4,35,3,34,2,33,1,32,0);
      const __m512i hi = _mm512_set_epi16(63,31,62,30,61,29,60,28,59,27,58,26,57,25,56,24,55,23,54,22,53,21,52,20,51,19,50,18,49,17,48,16);
      for (int64_t kp = 0; kp < Lkp / 2; ++kp) {
        uint16_t* ra = row.data(); uint16_t* rb = row.data() + D;
        if (2 * kp < Lk) row_to_bf16(vb + 2 * kp * vs[2], D, 1.0f, ra); else std::memset(ra, 0, D * 2);
        if (2 * kp + 1 < Lk) row_to_bf16(vb + (2 * kp + 1) * vs[2], D, 1.0f, rb); else std::memset(rb, 0, D * 2);
        for (int64_t d = 0; d < D; d += 32) {
          __m512i a = _mm512_loadu_si512(ra + d), bb = _mm512_loadu_si512(rb + d);
          _mm512_storeu_si512(Vp.data() + (kp * D + d) * 2, _mm512_permutex2var_epi16(a, lo, bb));
          _mm512_storeu_si512(Vp.data() + (kp * D + d + 16) * 2, _mm512_permutex2var_epi16(a, hi, bb));
        }
      }
      const T* qb = qd + b * qs[0] + h * qs[1];
      for (int64_t m0 = 0; m0 < Lq; m0 += 4) {
        const int R = (int)std::min<int64_t>(4, Lq - m0);
        for (int r = 0; r < R; ++r) row_to_bf16(qb + (m0 + r) * qs[2], D, sc, Qb.data() + r * D);
        switch (R) {
          case 4: qk_rows<4>(Qb.data(), D, Kp.data(), Lkp, S.data()); break;
          case 3: qk_rows<3>(Qb.data(), D, Kp.data(), Lkp, S.data()); break;
          case 2: qk_rows<2>(Qb.data(), D, Kp.data(), Lkp, S.data()); break;
          default: qk_rows<1>(Qb.data(), D, Kp.data(), Lkp, S.data()); break;
        }
        float inv[4];
        for (int r = 0; r < R; ++r) {
          float* s = S.data() + r * Lkp;
          const M* mr = md ? md + b * mB + h * mH + (m0 + r) * mQ : nullptr;
          __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
          for (int64_t n = 0; n < Lk; n += 16) {
            __mmask16 msk = (Lk - n) >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (Lk - n)) - 1);
            __m512 x = _mm512_maskz_loadu_ps(msk, s + n);
            if (mr) {
              if (mK == 1) x = _mm512_add_ps(x, load16_masked(mr + n, msk));
              else { alignas(64) float tmp[16]; for (int i = 0; i < 16; ++i) tmp[i] = (n + i < Lk) ? (float)mr[(n + i) * mK] : 0.f; x = _mm512_add_ps(x, _mm512_load_ps(tmp)); }
            }
            _mm512_mask_storeu_ps(s + n, msk, x);
            vmax = _mm512_mask_max_ps(vmax, msk, vmax, x);
          }
          float mx = _mm512_reduce_max_ps(vmax);
          const bool none = mx == -std::numeric_limits<float>::infinity();  // all masked: zeros
          if (none) mx = 0.f;
          const __m512 vm = _mm512_set1_ps(mx);
          __m512 vsum = _mm512_setzero_ps();
          uint16_t* p = P.data() + r * Lkp;
          for (int64_t n = 0; n < Lkp; n += 32) {
            __m512 e[2];
            for (int j = 0; j < 2; ++j) {
              const int64_t nn = n + 16 * j;
              const int64_t left = Lk - nn;
              __mmask16 msk = left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
              __m512 x = _mm512_maskz_loadu_ps(msk, s + nn);
              e[j] = _mm512_maskz_mov_ps(msk, exp512(_mm512_sub_ps(x, vm)));
              vsum = _mm512_add_ps(vsum, e[j]);
            }
            if (n + 32 <= Lkp) _mm512_storeu_si512(p + n, to_bf16x32(e[0], e[1]));
            else _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + n), (__m256i)_mm512_cvtneps_pbh(e[0]));
          }
          inv[r] = none ? 0.f : 1.0f / _mm512_reduce_add_ps(vsum);
        }
        switch (R) {
          case 4: pv_rows<4>(P.data(), Lkp, Vp.data(), D, O.data()); break;
          case 3: pv_rows<3>(P.data(), Lkp, Vp.data(), D, O.data()); break;
          case 2: pv_rows<2>(P.data(), Lkp, Vp.data(), D, O.data()); break;
          default: pv_rows<1>(P.data(), Lkp, Vp.data(), D, O.data()); break;
        }
        for (int r = 0; r < R; ++r) {
          T* o = od + b * os[0] + h * os[1] + (m0 + r) * os[2];
          const float* src = O.data() + r * D;
          store_scaled(src, D, inv[r], o);
        }
      }
    }
  });
}

}  // namespace

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "cpuboost attention: 4-d q, k, v");
  const int64_t D = q.size(3);
  TORCH_CHECK(D == 32 || D == 64 || D == 128, "cpuboost attention: head dim 32, 64 or 128, got ", D);
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0) && k.size(1) == q.size(1) &&
              v.size(1) == q.size(1) && k.size(3) == D && v.size(3) == D && v.size(2) == k.size(2),
              "cpuboost attention: q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes(), " do not match");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "cpuboost attention: q, k, v of one dtype");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "cpuboost attention: last dim contiguous");
  auto out = at::empty({q.size(0), q.size(2), q.size(1), D}, q.options()).transpose(1, 2);
  std::optional<at::Tensor> m = mask;
  if (m) {
    TORCH_CHECK(m->dim() == 4 && (m->size(0) == 1 || m->size(0) == q.size(0)) &&
                (m->size(1) == 1 || m->size(1) == q.size(1)) &&
                (m->size(2) == 1 || m->size(2) == q.size(2)) && m->size(3) == k.size(2),
                "cpuboost attention: mask ", m->sizes(), " does not broadcast to the scores");
    if (m->scalar_type() == at::kBool) m = at::where(*m, 0.0f, -std::numeric_limits<float>::infinity()).to(at::kFloat);
  }
  const bool bf = q.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf || q.scalar_type() == at::kFloat, "cpuboost attention: fp32 or bf16");
  if (bf) {
    if (m && m->scalar_type() == at::kBFloat16) attention_kernel<at::BFloat16, at::BFloat16>(q, k, v, m, scale, out);
    else { if (m) m = m->to(at::kFloat); attention_kernel<at::BFloat16, float>(q, k, v, m, scale, out); }
  } else {
    if (m && m->scalar_type() == at::kBFloat16) attention_kernel<float, at::BFloat16>(q, k, v, m, scale, out);
    else { if (m) m = m->to(at::kFloat); attention_kernel<float, float>(q, k, v, m, scale, out); }
  }
  return out;
}

TORCH_LIBRARY(cpuboost, m) {
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(cpuboost, CPU, m) { m.impl("attention", &attention); }
