// Constants of the vector e^x of the CPU row kernels (V::exp in row_kernels_avx2.cpp and
// simd_avx512.h, and the base-2 exp of row_fast_avx512.h; which differ only in how they round and build 2^n). The scalar tail
// uses std::exp; the clamp below which e^x is 0 is kExpUnderflow in row_state.h.
//
// e^x for x <= 0, Cephes-style (rel. error ~1e-7):
//   n = round(x log2(e)),  r = x - n ln(2)  in [-ln(2) / 2, ln(2) / 2],
//   e^r ~ 1 + r + r^2 (c0 r^5 + c1 r^4 + c2 r^3 + c3 r^2 + c4 r + c5)   (Horner, c0 first),
//   e^x = 2^n e^r.
// ln(2) is split as kLn2Hi + kLn2Lo: kLn2Hi has few mantissa bits, so n * kLn2Hi is exact and
// r keeps its accuracy where one rounded ln(2) would lose it.
#pragma once

namespace diffcirc::cpu::vec_exp {

constexpr float kLog2e = 1.44269504089f;
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                            4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

// 2^x for the AVX-512 one-pass rows (row_fast_avx512.h): n = round(x), f = x - n in [-1/2, 1/2],
// 2^x = 2^n p(f), p a minimax polynomial of 2^f (Horner, highest degree first; relative error in
// float32: degree 5 2.3e-7, degree 4 2.7e-6).
constexpr float kLn2 = 0.69314718056f;
constexpr float kExp2Poly5[6] = {1.327644451521337e-3f, 9.67553723603487e-3f, 5.550713464617729e-2f,
                                 2.4022120237350464e-1f, 6.931469440460205e-1f, 1.0000001192092896f};
constexpr float kExp2Poly4[5] = {9.570068679749966e-3f, 5.5917806923389435e-2f, 2.40247443318367e-1f,
                                 6.931218504905701e-1f, 9.999992847442627e-1f};

}  // namespace diffcirc::cpu::vec_exp
