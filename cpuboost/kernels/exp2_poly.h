// 2^f for f in [-0.5, 0.5] by its Taylor series to degree 6 (relative error < 2e-7), highest
// coefficient first, for Horner's rule: the fraction part of the kernels' e^x = 2^(x log2 e).
// Shared by attention.cpp (AVX-512) and act_avx2.h (AVX2).
#pragma once

constexpr float kExp2Poly[] = {1.5403530393381606e-4f, 1.3333558146428443e-3f,
                               9.6181291076284772e-3f, 5.5504108664821580e-2f,
                               2.4022650695910071e-1f, 6.9314718055994531e-1f, 1.0f};
constexpr float kLog2E = 1.44269504088896341f;
