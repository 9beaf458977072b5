// fp32 linear layers (y = x W^T + b, optionally followed by an activation: ReLU, GELU (erf or
// tanh), tanh, sigmoid, SiLU, hardswish) for CPUs with AVX2 and FMA but no AVX-512.
//
// Why: on the 2-core AVX2 Zen 3 this was written on, oneDNN's brgemm inner product ran BERT-base's
// linears at 98 GFLOP/s inside the model at 64 tokens (weights cold: 340 MB of them pass through a
// 32 MB L3 every forward) and MKL's sgemm at 74, while OpenVINO's MLAS kernels ran the same GEMMs
// at ~130. Linear layers are ~90% of BERT's time, so this is the whole fp32 gap to OpenVINO there.
//
// How: the weight is packed once into panels of 16 output features, [N/16][K][16], zero padded in
// N, so that each panel streams sequentially (what the hardware prefetcher follows). Panel by
// panel, K runs in blocks of 256: a panel's block (16 KB) stays in L1 while a block of up to 192
// rows of x (in L2) passes over it, 6 rows at a time, their 6x16 outputs in 12 ymm registers.
// Threads (torch's pool) split the rows into blocks and, when there are fewer row blocks than
// threads, the panels too. Bias and the activation are applied in the last K block, while the
// tile is still in registers. Each output is the same sum in the same order whichever thread
// computes it: results do not depend on the thread count.
//
// The weight may also be packed from bf16 (what dtype=bfloat16 means on CPUs without bf16
// instructions): half the bytes to stream, widened to fp32 in registers, the same FMAs. Or from
// int8 with one scale per output feature (weight-only int8, ``linear_scaled``): a quarter of the
// bytes, widened exactly to fp32; the sums are scaled (then the bias added) in the last K block.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include "gemm_tile_avx2.h"
#include <algorithm>
#include <cstdint>

namespace {

using namespace cpuboost_gemm_avx2;

// [N, K] -> [ceil(N/16), K, 16], zero padded in N. A bf16 weight gives bf16 panels (see
// load_weights for their order within a K step); it is multiplied in fp32, exactly.
template <typename T>
void pack_panels(const T* src, T* dst, int64_t N, int64_t K, bool interleave) {
  const int64_t P = (N + NR - 1) / NR;
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t cols = std::min<int64_t>(NR, N - p * NR);
      for (int64_t j = 0; j < cols; ++j) {
        const T* row = src + (p * NR + j) * K;
        const int64_t slot = interleave ? (j < 8 ? 2 * j : 2 * (j - 8) + 1) : j;
        T* col = dst + p * K * NR + slot;
        for (int64_t k = 0; k < K; ++k) col[k * NR] = row[k];
      }
    }
  });
}

at::Tensor pack_linear_weight(const at::Tensor& weight) {
  const auto dtype = weight.scalar_type();
  TORCH_CHECK(weight.dim() == 2 &&
              (dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kChar),
              "cpuboost::pack_linear_weight takes a 2-d float32, bfloat16 or int8 weight "
              "[out, in], got ", dtype, " of shape ", weight.sizes());
  const at::Tensor w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1), P = (N + NR - 1) / NR;
  at::Tensor out = at::zeros({P, K, NR}, w.options());
  if (dtype == at::kFloat) {
    pack_panels(w.data_ptr<float>(), out.data_ptr<float>(), N, K, false);
  } else if (dtype == at::kChar) {
    pack_panels(w.data_ptr<int8_t>(), out.data_ptr<int8_t>(), N, K, false);
  } else {
    pack_panels(reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()),
                reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()), N, K, true);
  }
  return out;
}

template <typename W>
void run_linear(const float* a, const W* w, float* c, const float* bias_ptr,
                const float* scale_ptr, int64_t M, int64_t N, int64_t K, int64_t P, int64_t act) {
  const int64_t threads = at::get_num_threads();
  int64_t mblocks = (M + MC - 1) / MC;
  if (mblocks >= threads) mblocks = (mblocks + threads - 1) / threads * threads;
  mblocks = std::min(mblocks, (M + MR - 1) / MR);
  const int64_t rows = ((M + mblocks - 1) / mblocks + MR - 1) / MR * MR;
  mblocks = (M + rows - 1) / rows;
  const int64_t nchunks = mblocks >= threads ? 1 : std::min(P, (threads + mblocks - 1) / mblocks);
  const int64_t per_chunk = (P + nchunks - 1) / nchunks;

  at::parallel_for(0, mblocks * nchunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t m0 = (u / nchunks) * rows, m1 = std::min(M, m0 + rows);
      const int64_t p0 = (u % nchunks) * per_chunk, p1 = std::min(P, p0 + per_chunk);
      gemm_rows(a, K, w, c, N, bias_ptr, scale_ptr, m0, m1, N, K, p0, p1, act);
    }
  });
}

// y = x W^T (* scale) + b, then the activation. scale (one per output feature) is required for
// int8 panels and refused otherwise.
at::Tensor linear_impl(const at::Tensor& input, const at::Tensor& packed,
                       const std::optional<at::Tensor>& scale,
                       const std::optional<at::Tensor>& bias, int64_t out_features, int64_t act,
                       const char* op) {
  const auto wtype = packed.scalar_type();
  TORCH_CHECK(input.scalar_type() == at::kFloat &&
              (wtype == at::kFloat || wtype == at::kBFloat16 || wtype == at::kChar),
              op, " computes in float32 (from float32, bfloat16 or int8 weights), got input ",
              input.scalar_type(), " and weight ", wtype);
  TORCH_CHECK(scale.has_value() == (wtype == at::kChar), op, ": ",
              wtype == at::kChar ? "int8 weights need their per-feature scales (use "
                                   "cpuboost::linear_scaled)"
                                 : "only int8 weights take scales");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == NR && packed.is_contiguous(),
              op, ": the weight was not packed by cpuboost::pack_linear_weight");
  const int64_t K = packed.size(1), P = packed.size(0), N = out_features;
  TORCH_CHECK(input.dim() >= 1 && input.size(-1) == K, op, ": input has ",
              input.size(-1), " features, the weight expects ", K);
  TORCH_CHECK(K > 0, op, ": a weight with 0 input features (use F.linear)");
  TORCH_CHECK(N > (P - 1) * NR && N <= P * NR, op, ": ", N,
              " output features do not fit a packed weight of ", P, " panels");
  TORCH_CHECK(act >= kNone && act < kActs, op, ": unknown activation ", act);
  const at::Tensor x = input.contiguous();
  const int64_t M = x.numel() / K;
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape.back() = N;
  at::Tensor out = at::empty(shape, x.options());
  if (M == 0) return out;
  // the tiles read a whole panel's 16 bias (scale) values, except in the last panel (nvalid)
  at::Tensor b, s;
  const float* bias_ptr = nullptr;
  const float* scale_ptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N && bias->scalar_type() == at::kFloat,
                op, ": bias must be float32 with ", N, " values");
    b = bias->contiguous();
    bias_ptr = b.data_ptr<float>();
  }
  if (scale.has_value()) {
    TORCH_CHECK(scale->numel() == N && scale->scalar_type() == at::kFloat,
                op, ": scale must be float32 with ", N, " values");
    s = scale->contiguous();
    scale_ptr = s.data_ptr<float>();
  }
  const float* a = x.data_ptr<float>();
  float* c = out.data_ptr<float>();
  if (wtype == at::kFloat) {
    run_linear(a, packed.data_ptr<float>(), c, bias_ptr, scale_ptr, M, N, K, P, act);
  } else if (wtype == at::kChar) {
    run_linear(a, packed.data_ptr<int8_t>(), c, bias_ptr, scale_ptr, M, N, K, P, act);
  } else {
    run_linear(a, reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>()), c,
               bias_ptr, scale_ptr, M, N, K, P, act);
  }
  return out;
}

at::Tensor linear(const at::Tensor& input, const at::Tensor& packed,
                  const std::optional<at::Tensor>& bias, int64_t out_features, int64_t act) {
  return linear_impl(input, packed, std::nullopt, bias, out_features, act, "cpuboost::linear");
}

at::Tensor linear_scaled(const at::Tensor& input, const at::Tensor& packed, const at::Tensor& scale,
                         const std::optional<at::Tensor>& bias, int64_t out_features, int64_t act) {
  return linear_impl(input, packed, scale, bias, out_features, act, "cpuboost::linear_scaled");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cpuboost, m) {
  m.def("pack_linear_weight(Tensor weight) -> Tensor");
  m.def("linear(Tensor input, Tensor packed, Tensor? bias, int out_features, int act) -> Tensor");
  m.def("linear_scaled(Tensor input, Tensor packed, Tensor scale, Tensor? bias, int out_features, "
        "int act) -> Tensor");
}

TORCH_LIBRARY_IMPL(cpuboost, CPU, m) {
  m.impl("pack_linear_weight", &pack_linear_weight);
  m.impl("linear", &linear);
  m.impl("linear_scaled", &linear_scaled);
}
