// Known answers for csrc/philox.h, without torch: Random123's Philox4x32-10 vectors, sampled elements of
// the shared projections (vera_kernels/data/philox_projections.json, from an independent implementation) and
// hand-checked float -> half roundings.
#include <cstdio>
#include <cstring>

#include "philox.h"

namespace {

int failures = 0;

void expect_eq(unsigned long long got, unsigned long long want, const char* what, int index) {
  if (got != want) {
    std::printf("FAIL %s [%d]: got %llu (0x%llx), want %llu (0x%llx)\n", what, index, got, got, want, want);
    ++failures;
  }
}

void test_known_answer_vectors() {
  struct Vector {
    uint32_t ctr[4], key[2], out[4];
  };
  const Vector vectors[] = {
      {{0, 0, 0, 0}, {0, 0}, {1713891541u, 3781805453u, 3159862348u, 2600524760u}},
      {{0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu},
       {0xFFFFFFFFu, 0xFFFFFFFFu},
       {1083123565u, 1103641358u, 2718681030u, 1834242557u}},
      {{608135816u, 2242054355u, 320440878u, 57701188u},
       {2752067618u, 698298832u},
       {3513581065u, 2499661035u, 1342301216u, 605187745u}},
  };
  int index = 0;
  for (const Vector& v : vectors) {
    const vera::PhiloxWords words = vera::philox4x32_10(v.ctr, v.key);
    for (int k = 0; k < 4; ++k) expect_eq(words.w[k], v.out[k], "philox4x32_10", index);
    ++index;
  }
}

void test_projection_elements() {
  struct Element {
    uint64_t seed;
    uint32_t tag;
    uint64_t row, col;
    int64_t fan_in;
    uint32_t word, fp32_bits;
    uint16_t bf16_bits;
  };
  // Both tags, a seed above 2^32 (high key word) and the largest row/column of their matrices.
  const Element elements[] = {
      {0, 0, 103, 6259, 11008, 2106894599u, 3118946698u, 47591},
      {3735928559u, 1, 624, 56, 256, 2249333963u, 1005448314u, 15342},
      {4294967303u, 1, 0, 1023, 1024, 2702821777u, 1017260265u, 15522},
      {1234567890123456789u, 1, 65535, 1023, 1024, 2671448074u, 1016659880u, 15513},
  };
  int index = 0;
  for (const Element& e : elements) {
    const float scale = vera::projection_scale(e.fan_in);
    const uint32_t word = vera::projection_words(e.seed, e.tag, e.row, e.col >> 2).w[e.col & 3];
    const float value = vera::projection_value(e.seed, e.tag, e.row, e.col, scale);
    expect_eq(word, e.word, "projection word", index);
    expect_eq(vera::float_bits(value), e.fp32_bits, "projection fp32 bits", index);
    expect_eq(vera::fp32_to_bf16_bits(value), e.bf16_bits, "projection bf16 bits", index);
    ++index;
  }
}

void test_fp16_rounding() {
  struct Case {
    float in;
    uint16_t out;
  };
  const Case cases[] = {
      {1.0f, 0x3C00},
      {65504.0f, 0x7BFF},         // largest half
      {65520.0f, 0x7C00},         // halfway to 2^16: ties to even, which is infinity
      {0x1p-24f, 0x0001},         // smallest subnormal
      {0x1p-25f, 0x0000},         // half of it: tie to even zero
      {0x1.8p-25f, 0x0001},       // above the tie
      {0x3p-25f, 0x0002},         // 1.5 subnormal units: tie to even
      {-0.0f, 0x8000},
      {0x1.ffcp-15f, 0x0400},     // tie between the largest subnormal (odd) and the smallest normal
      {1.0f + 0x1p-11f, 0x3C00},  // tie between 1 and its successor: to even
      {1.0f + 0x3p-11f, 0x3C02},  // tie between 0x3C01 and 0x3C02: to even
  };
  int index = 0;
  for (const Case& c : cases) {
    expect_eq(vera::fp32_to_fp16_bits(c.in), c.out, "fp32_to_fp16_bits", index);
    ++index;
  }
}

}  // namespace

int main() {
  test_known_answer_vectors();
  test_projection_elements();
  test_fp16_rounding();
  if (failures == 0) std::printf("test_philox: all passed\n");
  return failures == 0 ? 0 : 1;
}
