// The shared random projections (docs/DESIGN.md section 3), element by element.
//
// Header-only and free of torch and CUDA headers so that the CPU kernels, the CUDA kernels and the C++
// unit test compile the very same code. Only integer operations, one exact int->float conversion and
// one IEEE multiply are used, so every backend produces the same bits.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#define VERA_HD __host__ __device__ __forceinline__
#else
#define VERA_HD inline
#endif

namespace vera {

struct PhiloxWords {
  uint32_t w[4];
};

// Random123 Philox4x32-10. The 64-bit product gives the high and low halves of the 32x32 multiply on
// every compiler; nvcc lowers it to mul.hi/mul.lo.
VERA_HD PhiloxWords philox4x32_10(const uint32_t ctr[4], const uint32_t key[2]) {
  uint32_t c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3];
  uint32_t k0 = key[0], k1 = key[1];
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = uint64_t(0xD2511F53u) * c0;
    const uint64_t p1 = uint64_t(0xCD9E8D57u) * c2;
    const uint32_t hi0 = uint32_t(p0 >> 32), lo0 = uint32_t(p0);
    const uint32_t hi1 = uint32_t(p1 >> 32), lo1 = uint32_t(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return PhiloxWords{{c0, c1, c2, c3}};
}

// bound * 2^-24, where bound = sqrt(6 / fan_in) as PEFT computes it (in double, then rounded to
// float). The power-of-two multiply is exact, so scaling the 25-bit integer by it is one rounding.
VERA_HD float projection_scale(int64_t fan_in) {
  const float bound = float(sqrt(3.0) * (sqrt(2.0) / sqrt(double(fan_in))));
  return bound * 0x1p-24f;
}

// The four words holding the elements (row, 4 * col_group .. 4 * col_group + 3) of matrix `tag`.
VERA_HD PhiloxWords projection_words(uint64_t seed, uint32_t tag, uint64_t row, uint64_t col_group) {
  const uint32_t key[2] = {uint32_t(seed & 0xFFFFFFFFu), uint32_t(seed >> 32)};
  const uint32_t ctr[4] = {uint32_t(col_group), uint32_t(row), tag, 0u};
  return philox4x32_10(ctr, key);
}

// Maps a word to an odd integer s with |s| < 2^24 (exact in fp32, symmetric around zero), then scales.
VERA_HD float projection_value_from_word(uint32_t word, float scale) {
  const int32_t s = int32_t(2u * (word >> 8) + 1u) - (1 << 24);
  return float(s) * scale;
}

VERA_HD float projection_value(uint64_t seed, uint32_t tag, uint64_t row, uint64_t col, float scale) {
  return projection_value_from_word(projection_words(seed, tag, row, col >> 2).w[col & 3], scale);
}

VERA_HD uint32_t float_bits(float v) {
  uint32_t bits;
  memcpy(&bits, &v, sizeof bits);
  return bits;
}

// Round-to-nearest-even to bfloat16 with integer ops (finite inputs only): a float cast would depend
// on the backend (Triton's interpreter truncates, for one).
VERA_HD uint16_t fp32_to_bf16_bits(float v) {
  const uint32_t bits = float_bits(v);
  return uint16_t((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

// Round-to-nearest-even to IEEE half with integer ops (finite inputs only), including half subnormals
// and overflow to infinity, for the same reason as fp32_to_bf16_bits.
VERA_HD uint16_t fp32_to_fp16_bits(float v) {
  const uint32_t x = float_bits(v);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t a = x & 0x7FFFFFFFu;
  const uint32_t e = a >> 23;
  uint32_t h;
  if (a >= 0x477FF000u) {
    // At or above 65520 = halfway between 65504 (largest half) and 2^16: rounds to infinity.
    h = 0x7C00u;
  } else if (e >= 113) {
    // Normal half. A carry out of the mantissa correctly bumps the exponent.
    h = ((e - 112) << 10) | ((a >> 13) & 0x3FFu);
    const uint32_t rem = a & 0x1FFFu;
    h += (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ? 1u : 0u;
  } else if (e < 102) {
    // Below 2^-25, half the smallest subnormal: rounds to zero.
    h = 0;
  } else {
    // Subnormal half: the value in units of 2^-24, rounded. A carry into 0x400 gives the smallest normal.
    const uint32_t m = (a & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126 - e;  // 14..24
    uint32_t q = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1);
    q += (rem > half || (rem == half && (q & 1u))) ? 1u : 0u;
    h = q;
  }
  return uint16_t(sign | h);
}

}  // namespace vera
