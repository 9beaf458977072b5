// AVX2 activations for the output tiles of the linear kernels (torch.nn's definitions): ReLU,
// GELU (erf or tanh), tanh, sigmoid, SiLU, hardswish. Shared by gemm_avx2.cpp (fp32, bf16 and
// int8 weights) and gemm_u8s8_avx2.cpp (int8 x int8).
#pragma once
#include <immintrin.h>
#include <cstdint>
#include "exp2_poly.h"

namespace cpuboost_avx2 {

// activations applied to the output tile in registers (torch.nn's definitions)
enum Act : int64_t { kNone, kRelu, kGelu, kGeluTanh, kTanh, kSigmoid, kSilu, kHardswish, kActs };

// e^x: 2^(x log2 e), 2^fraction by a degree-6 polynomial (relative error < 2e-7 on
// [-0.5, 0.5]) scaled by 2^integer through the exponent bits; x clamped to [-87, 88].
inline __m256 exp256(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(kLog2E));
  __m256 fi = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 f = _mm256_sub_ps(t, fi);
  __m256 p = _mm256_set1_ps(kExp2Poly[0]);
#pragma GCC unroll 6
  for (int i = 1; i < 7; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2Poly[i]));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fi), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline __m256 sigmoid(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

// sign(x) (1 - e) / (1 + e), e = e^(-2|x|): absolute error ~1e-7
inline __m256 tanh256(__m256 x) {
  const __m256 sign_mask = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f);
  __m256 e = exp256(_mm256_mul_ps(_mm256_andnot_ps(sign_mask, x), _mm256_set1_ps(-2.0f)));
  __m256 t = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
  return _mm256_or_ps(t, _mm256_and_ps(x, sign_mask));
}

// x * (1 + erf(x / sqrt 2)) / 2, erf by Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7)
inline __m256 gelu(__m256 x) {
  const __m256 sign_mask = _mm256_set1_ps(-0.0f);
  __m256 z = _mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752f));
  __m256 az = _mm256_andnot_ps(sign_mask, z);
  __m256 t = _mm256_div_ps(_mm256_set1_ps(1.0f),
                           _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), az, _mm256_set1_ps(1.0f)));
  __m256 p = _mm256_set1_ps(1.061405429f);
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.453152027f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.421413741f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.284496736f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.254829592f));
  p = _mm256_mul_ps(p, t);
  __m256 e = exp256(_mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), az), az));
  __m256 erf_abs = _mm256_fnmadd_ps(p, e, _mm256_set1_ps(1.0f));        // erf(|z|)
  __m256 erf = _mm256_or_ps(erf_abs, _mm256_and_ps(z, sign_mask));      // sign of z
  __m256 half_x = _mm256_mul_ps(x, _mm256_set1_ps(0.5f));
  return _mm256_fmadd_ps(half_x, erf, half_x);
}

inline __m256 activate(__m256 x, int64_t act) {
  const __m256 zero = _mm256_setzero_ps();
  switch (act) {
    case kRelu: return _mm256_max_ps(x, zero);
    case kGelu: return gelu(x);
    case kGeluTanh: {  // x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) / 2
      __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
      __m256 inner = _mm256_mul_ps(_mm256_fmadd_ps(x3, _mm256_set1_ps(0.044715f), x),
                                   _mm256_set1_ps(0.7978845608028654f));
      __m256 half_x = _mm256_mul_ps(x, _mm256_set1_ps(0.5f));
      return _mm256_fmadd_ps(half_x, tanh256(inner), half_x);
    }
    case kTanh: return tanh256(x);
    case kSigmoid: return sigmoid(x);
    case kSilu: return _mm256_mul_ps(x, sigmoid(x));
    case kHardswish: {  // x min(max(x + 3, 0), 6) / 6
      __m256 r = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(x, _mm256_set1_ps(3.0f)), zero),
                               _mm256_set1_ps(6.0f));
      return _mm256_mul_ps(_mm256_mul_ps(x, r), _mm256_set1_ps(1.0f / 6.0f));
    }
    default: return x;
  }
}

}  // namespace cpuboost_avx2
