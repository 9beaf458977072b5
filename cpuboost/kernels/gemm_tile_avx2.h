// The register-tile GEMM of cpuboost's fp32 AVX2 kernels (gemm_avx2.cpp, winograd_avx2.cpp):
// c = a @ b over weights packed in panels of 16 output features, [N/16][K][16] (see
// gemm_avx2.cpp's header for the blocking and why).
#pragma once
#include <immintrin.h>
#include <algorithm>
#include <cstdint>
#include "act_avx2.h"

namespace cpuboost_gemm_avx2 {

using namespace cpuboost_avx2;

constexpr int NR = 16;       // output features per panel (two ymm)
constexpr int MR = 6;        // rows per register tile: 12 accumulators + 2 weights + 1 broadcast
constexpr int64_t KC = 256;  // K block: a panel's block (16 KB) stays in L1
constexpr int64_t MC = 192;  // rows per block: x's block (192 KB at KC=256) stays in L2

// The 16 weights of one K step as two fp32 vectors (columns 0-7, 8-15). float panels hold them
// in order; bf16 panels (uint16 bits) hold column j in the low and column j+8 in the high half of
// 32-bit word j, so a shift and a mask widen them exactly (bf16 is fp32's upper half).
// Unaligned loads: the packed weight need not start on 32 bytes (AOTInductor's constants did
// not, and aligned loads faulted there); on aligned data they cost the same.
inline void load_weights(const float* b, __m256& w0, __m256& w1) {
  w0 = _mm256_loadu_ps(b);
  w1 = _mm256_loadu_ps(b + 8);
}

inline void load_weights(const int8_t* b, __m256& w0, __m256& w1) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b));
  w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
  w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)));
}

inline void load_weights(const uint16_t* b, __m256& w0, __m256& w1) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b));
  w0 = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  w1 = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// acc[0:M, 0:16] += a[0:M, 0:kc] @ b[0:kc, 0:16]. Kept out of line so that the register
// allocator sees only this loop: 12 accumulators + 2 weight vectors + 1 broadcast of the 16 ymm
// (inlined into the tile, GCC spilled an accumulator to the stack every iteration).
template <typename W, int M>
__attribute__((noinline)) void kloop(const float* a, int64_t lda, const W* b, int64_t kc,
                                     float* acc_mem) {
  __m256 acc[M][2];
#pragma GCC unroll 6
  for (int i = 0; i < M; ++i) {
    acc[i][0] = _mm256_load_ps(acc_mem + i * NR);
    acc[i][1] = _mm256_load_ps(acc_mem + i * NR + 8);
  }
#pragma GCC unroll 4  // 4: 81-85 GFLOP/s on one core from L1 (peak 99); 2: 72-78
  for (int64_t k = 0; k < kc; ++k) {
    // ask for the panel's line 2 KB ahead (it may be the next K block or panel: they follow in
    // memory). Cold weights at 17 rows: ours/oneDNN 0.53-0.64 with it, 0.68-0.76 without (3
    // alternating runs each); at 64 rows within the noise.
    _mm_prefetch(reinterpret_cast<const char*>(b + k * NR) + 2048, _MM_HINT_T0);
    __m256 w0, w1;
    load_weights(b + k * NR, w0, w1);
#pragma GCC unroll 6
    for (int i = 0; i < M; ++i) {
      const __m256 x = _mm256_broadcast_ss(a + i * lda + k);
      acc[i][0] = _mm256_fmadd_ps(x, w0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(x, w1, acc[i][1]);
    }
  }
#pragma GCC unroll 6
  for (int i = 0; i < M; ++i) {
    _mm256_store_ps(acc_mem + i * NR, acc[i][0]);
    _mm256_store_ps(acc_mem + i * NR + 8, acc[i][1]);
  }
}

// c[0:M, 0:nvalid] (+)= a[0:M, 0:kc] @ b[0:kc, 0:16]; a's rows lda apart, c's rows ldc apart.
// first: start from the bias (or zero); else from c. last: apply the activation. With a scale
// (int8 weights): sums start from zero and the last block makes them scale * sum + bias.
template <typename W, int M>
void tile(const float* a, int64_t lda, const W* b, int64_t kc, float* c, int64_t ldc,
          int nvalid, const float* bias, const float* scale, bool first, bool last,
          int64_t act) {
  alignas(32) float acc[M * NR];
  const bool full = nvalid == NR;
  const float* start = scale ? nullptr : bias;
  for (int i = 0; i < M; ++i) {
    float* row = acc + i * NR;
    if (first && (full || !start)) {
      const __m256 b0 = start ? _mm256_loadu_ps(start) : _mm256_setzero_ps();
      const __m256 b1 = start ? _mm256_loadu_ps(start + 8) : _mm256_setzero_ps();
      _mm256_store_ps(row, b0);
      _mm256_store_ps(row + 8, b1);
    } else if (first) {  // the last panel's bias has nvalid values
      for (int j = 0; j < NR; ++j) row[j] = j < nvalid ? start[j] : 0.0f;
    } else if (full) {
      _mm256_store_ps(row, _mm256_loadu_ps(c + i * ldc));
      _mm256_store_ps(row + 8, _mm256_loadu_ps(c + i * ldc + 8));
    } else {
      for (int j = 0; j < nvalid; ++j) row[j] = c[i * ldc + j];
    }
  }
  kloop<W, M>(a, lda, b, kc, acc);
  if (last && scale) {
    alignas(32) float sc[NR], bs[NR];
    for (int j = 0; j < NR; ++j) {
      sc[j] = j < nvalid ? scale[j] : 0.0f;
      bs[j] = bias && j < nvalid ? bias[j] : 0.0f;
    }
    for (int i = 0; i < M; ++i) {
      for (int h = 0; h < NR; h += 8) {
        float* at = acc + i * NR + h;
        _mm256_store_ps(at, _mm256_fmadd_ps(_mm256_load_ps(at), _mm256_load_ps(sc + h),
                                            _mm256_load_ps(bs + h)));
      }
    }
  }
  for (int i = 0; i < M; ++i) {
    float* row = acc + i * NR;
    if (last && act != kNone) {
      for (int h = 0; h < NR; h += 8) {
        const __m256 v = _mm256_load_ps(row + h);
        _mm256_store_ps(row + h, activate(v, act));
      }
    }
    if (full) {
      _mm256_storeu_ps(c + i * ldc, _mm256_load_ps(row));
      _mm256_storeu_ps(c + i * ldc + 8, _mm256_load_ps(row + 8));
    } else {
      for (int j = 0; j < nvalid; ++j) c[i * ldc + j] = row[j];
    }
  }
}

template <typename W>
using TileFn = void (*)(const float*, int64_t, const W*, int64_t, float*, int64_t, int,
                        const float*, const float*, bool, bool, int64_t);
template <typename W>
constexpr TileFn<W> kTiles[MR + 1] = {nullptr,     tile<W, 1>, tile<W, 2>, tile<W, 3>,
                                      tile<W, 4>, tile<W, 5>, tile<W, 6>};

// c[m0:m1, panels p0:p1] = a[m0:m1, :K] @ panels p0..p1 of w (+ bias, * scale, activation as
// in tile), rows of a lda apart and of c ldc apart, on the calling thread: rows in blocks of
// MC, then panel by panel, K in blocks of KC, MR rows at a time.
template <typename W>
void gemm_rows(const float* a, int64_t lda, const W* w, float* c, int64_t ldc,
               const float* bias, const float* scale, int64_t m0, int64_t m1, int64_t N,
               int64_t K, int64_t p0, int64_t p1, int64_t act) {
  for (int64_t b0 = m0; b0 < m1; b0 += MC) {
    const int64_t b1 = std::min(m1, b0 + MC);
    for (int64_t p = p0; p < p1; ++p) {
      const int nvalid = static_cast<int>(std::min<int64_t>(NR, N - p * NR));
      const float* bp = bias ? bias + p * NR : nullptr;
      const float* sp = scale ? scale + p * NR : nullptr;
      for (int64_t k0 = 0; k0 < K; k0 += KC) {
        const int64_t kc = std::min(KC, K - k0);
        const bool first = k0 == 0, last = k0 + kc == K;
        const W* panel = w + (p * K + k0) * NR;
        for (int64_t i = b0; i < b1; i += MR) {
          const int mr = static_cast<int>(std::min<int64_t>(MR, b1 - i));
          kTiles<W>[mr](a + i * lda + k0, lda, panel, kc, c + i * ldc + p * NR, ldc, nvalid,
                        bp, sp, first, last, act);
        }
      }
    }
  }
}

}  // namespace cpuboost_gemm_avx2
