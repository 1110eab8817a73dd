// The tensor-core dot products of the W4A16 kernels over the packed int4 layout (docs/layout.md): one
// 128-row chunk of a warp's 32-column block (kernels/cuda/w4a16_gemv.cu, kernels/cuda/decode_attention.cu).
#pragma once

#include "common.cuh"

// One group's zero points (4 bytes) and (s, m) pairs (16 bytes) for the thread's 4 columns, as loaded.
struct GroupRaw {
  u32 z4;
  uint4 sm;
};

DEV GroupRaw load_group(const uint4* __restrict__ sz, const u32* __restrict__ zp, int g, int N, int n0) {
  const size_t at = ((size_t)g * N + n0) >> 2;
  return GroupRaw{ld_nc32(zp + at), ld_nc(sz + at)};
}

DEV u32 pick(const uint4& v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }

// Tensor-core path (TC): (q - z) * 2^-24 as exact fp16 subnormals (nibbles masked in place, no OR), the dot
// products on mma.m16n8k16 with float32 accumulation, the scale * 2^24 applied once per group and column.
// Lane = 4 * g + c: g picks the column quad (4 g .. 4 g + 3 of the warp's block), c the word-rows
// 4 c .. 4 c + 3. An mma's A rows are two of the thread's columns (g, g + 8 <-> columns i0, i1), its k pairs
// c and c + 4 two of its word-rows (j0, j1) in one slice t; B is the activation pairs of those rows, the same
// in every token column, so every lane ends with the whole warp's sum for its columns (no shuffles).
DEV void dequant_tc(u32 w, u32 z0, u32 nz1, u32 z2, u32 nz3, u32& d0, u32& d1, u32& d2, u32& d3) {
  asm("{\n"
      ".reg .b32 u, a, b, c, d, k;\n"
      "mov.b32 k, 0x2C002C00;\n"  // 1/16: slices 1 and 3 sit 4 bits up
      "and.b32 a, %4, 0x000F000F;\n"
      "and.b32 b, %4, 0x00F000F0;\n"
      "shr.u32 u, %4, 8;\n"
      "and.b32 c, u, 0x000F000F;\n"
      "and.b32 d, u, 0x00F000F0;\n"
      "sub.f16x2 %0, a, %5;\n"
      "fma.rn.f16x2 %1, b, k, %6;\n"
      "sub.f16x2 %2, c, %7;\n"
      "fma.rn.f16x2 %3, d, k, %8;\n"
      "}\n"
      : "=r"(d0), "=r"(d1), "=r"(d2), "=r"(d3)
      : "r"(w), "r"(z0), "r"(nz1), "r"(z2), "r"(nz3));
}

DEV void mma16816(float c[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

DEV u32 zsub_of(const GroupRaw& q, int i) { return ((q.z4 >> (8 * i)) & 0xFFu) * 0x10001u; }  // z 2^-24
DEV u32 nzsub_of(const GroupRaw& q, int i) {  // -z 2^-24
  return (0x8000u | ((q.z4 >> (8 * i)) & 0xFFu)) * 0x10001u;
}
DEV float scale_of(const GroupRaw& q, int i) {  // s * 2^24
  return f16_to_f32((u16)(pick(q.sm, i) & 0xFFFFu)) * 16777216.0f;
}

#ifndef LMKILN_CHAINS
#define LMKILN_CHAINS 2
#endif
constexpr int CHAINS = LMKILN_CHAINS;  // independent mma accumulators a column pair (1 or 2)

// One chunk: the thread's 4 word-rows `w` of its 4 columns, their groups `q`, the activation pairs `xt`
// (xt[t] = slice t's pairs of the thread's word-rows) -> acc[i] += column i's sum over the warp's chunk.
template <int GROUP>
DEV void chunk_tc(const uint4 w[4], const GroupRaw q[128 / GROUP], const uint4 xt[4], float acc[4]) {
  constexpr int SPG = GROUP / 32, NG = 128 / GROUP;
  u32 d[4][4][4];  // [word-row j][column i][slice t]
#pragma unroll
  for (int j = 0; j < 4; j++) {
#pragma unroll
    for (int i = 0; i < 4; i++) {
      dequant_tc(pick(w[j], i), zsub_of(q[0 / SPG], i), nzsub_of(q[1 / SPG], i),
                 zsub_of(q[2 / SPG], i), nzsub_of(q[3 / SPG], i), d[j][i][0], d[j][i][1],
                 d[j][i][2], d[j][i][3]);
    }
  }
#ifdef LMKILN_NOMATH  // experiment: the loads and the loop without the dot products
  u32 h = 0;
#pragma unroll
  for (int j = 0; j < 4; j++)
#pragma unroll
    for (int i = 0; i < 4; i++)
      h ^= d[j][i][0] ^ d[j][i][1] ^ d[j][i][2] ^ d[j][i][3] ^ xt[i].x ^ xt[j].y;
  acc[0] += __int_as_float(h & 0x007FFFFF);
#else
#pragma unroll
  for (int ip = 0; ip < 2; ip++) {
    float cg[CHAINS][NG][4];  // CHAINS independent mma chains (word-row pairs), summed per group
#pragma unroll
    for (int ch = 0; ch < CHAINS; ch++)
#pragma unroll
      for (int gi = 0; gi < NG; gi++) cg[ch][gi][0] = cg[ch][gi][1] = cg[ch][gi][2] = cg[ch][gi][3] = 0.f;
#pragma unroll
    for (int t = 0; t < 4; t++) {
#pragma unroll
      for (int jp = 0; jp < 2; jp++) {
        mma16816(cg[jp % CHAINS][t / SPG], d[2 * jp][2 * ip][t], d[2 * jp][2 * ip + 1][t],
                 d[2 * jp + 1][2 * ip][t], d[2 * jp + 1][2 * ip + 1][t], pick(xt[t], 2 * jp),
                 pick(xt[t], 2 * jp + 1));
      }
    }
#pragma unroll
    for (int gi = 0; gi < NG; gi++) {
      float c0 = cg[0][gi][0], c2 = cg[0][gi][2];
#pragma unroll
      for (int ch = 1; ch < CHAINS; ch++) c0 += cg[ch][gi][0], c2 += cg[ch][gi][2];
      acc[2 * ip] += c0 * scale_of(q[gi], 2 * ip);
      acc[2 * ip + 1] += c2 * scale_of(q[gi], 2 * ip + 1);
    }
  }
#endif
}
