// Batch-1 W4A16 GEMV over the packed int4 layout (docs/layout.md, lmkiln-w4-tiled v1), fp16 activations.
// Compiled at run time by NVRTC (kernels/cuda_jit.py, launcher kernels/w4a16_cuda.py); no CUDA headers.
//
// y[N] = x[K] @ W. A CTA is WARPS x KSPLIT warps: warp w owns the 32-column block b = WARPS * blockIdx.x +
// w % WARPS and part w / WARPS of the chunks (128 rows each) of split blockIdx.y. Word-row r of a chunk holds
// rows (2r, 2r + 1) of its four 32-row slices (nibbles t, t + 4). A thread loads 16 bytes (4 columns) of 4
// consecutive word-rows of every chunk, so its activation pairs of slice t are 4 consecutive (x[k], x[k+1])
// pairs, one 16-byte load (L1-cached: every CTA of an SM reads the same x); a warp load is four fully used
// 128-byte lines.
//
// TC (the dispatcher's choice): lane = 4 g + c holds columns 4g..4g+3 and word-rows 4c..4c+3; each word
// becomes four half2 (q - z) * 2^-24 (exact fp16 subnormals) that feed mma.m16n8k16 (float32 sums), the
// scale applied once per group (compute_stage_tc). Otherwise lane = 8 r0 + cq holds columns 4cq..4cq+3 and
// word-rows 4r0..4r0+3, and each word becomes four half2 (q - z) * s for fma.rn.f16x2 with a float32 flush
// every FLUSH word-rows (compute_stage, as kernels/w4a16.py's fma kernel).
//
// A CTA's KSPLIT partials meet in shared memory; the splits then meet by red.global.add into a zeroed float32
// output (REDUCE 0; the consumer zeroes it again) or in split order through a float32 workspace and a
// counter (one split: neither), the last CTA of a tile writing fp16 (REDUCE 1) or silu(gate) * up of an
// interleaved gate/up weight (REDUCE 2). Programmatic dependent launch: weights (never written) are read
// before griddepcontrol.wait (PRELOAD), everything else after it.

#include "common.cuh"

DEV uint4 ld_stream(const uint4* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

// One word -> four half2 (q - z) * s: slices 0, 2 by `1024 + q - (1024 + z)`, slices 1, 3 (nibbles shifted
// by 4) by `(1024 + 16 q) / 16 - (64 + z)`; both exact, then one rounding by the scale.
DEV void dequant(u32 w, u32 zs0, u32 zf1, u32 zs2, u32 zf3, u32 s0, u32 s1, u32 s2, u32 s3, u32& d0,
                 u32& d1, u32& d2, u32& d3) {
  asm("{\n"
      ".reg .b32 u, a, b, c, d, k;\n"
      "mov.b32 k, 0x2C002C00;\n"
      "lop3.b32 a, %4, 0x000F000F, 0x64006400, 0xEA;\n"
      "lop3.b32 b, %4, 0x00F000F0, 0x64006400, 0xEA;\n"
      "shr.u32 u, %4, 8;\n"
      "lop3.b32 c, u, 0x000F000F, 0x64006400, 0xEA;\n"
      "lop3.b32 d, u, 0x00F000F0, 0x64006400, 0xEA;\n"
      "sub.f16x2 a, a, %5;\n"
      "fma.rn.f16x2 b, b, k, %6;\n"
      "sub.f16x2 c, c, %7;\n"
      "fma.rn.f16x2 d, d, k, %8;\n"
      "mul.rn.f16x2 %0, a, %9;\n"
      "mul.rn.f16x2 %1, b, %10;\n"
      "mul.rn.f16x2 %2, c, %11;\n"
      "mul.rn.f16x2 %3, d, %12;\n"
      "}\n"
      : "=r"(d0), "=r"(d1), "=r"(d2), "=r"(d3)
      : "r"(w), "r"(zs0), "r"(zf1), "r"(zs2), "r"(zf3), "r"(s0), "r"(s1), "r"(s2), "r"(s3));
}

DEV u32 hfma2(u32 a, u32 b, u32 c) {
  u32 d;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

DEV float h2_sum(u32 a) {  // float(lo) + float(hi)
  float r;
  asm("{\n"
      ".reg .b16 l, h;\n"
      ".reg .f32 fl, fh;\n"
      "mov.b32 {l, h}, %1;\n"
      "cvt.f32.f16 fl, l;\n"
      "cvt.f32.f16 fh, h;\n"
      "add.f32 %0, fl, fh;\n"
      "}\n"
      : "=f"(r)
      : "r"(a));
  return r;
}

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
DEV u32 zs_of(const GroupRaw& q, int i) {  // 1024 + z
  return (0x6400u + ((q.z4 >> (8 * i)) & 0xFFu)) * 0x10001u;
}
DEV u32 zf_of(const GroupRaw& q, int i) {  // -(64 + z)
  return (0xD400u + 16u * ((q.z4 >> (8 * i)) & 0xFFu)) * 0x10001u;
}
DEV u32 s_of(const GroupRaw& q, int i) { return (pick(q.sm, i) & 0xFFFFu) * 0x10001u; }

template <int GROUP, int UNROLL>
struct Stage {
  uint4 w[UNROLL][4];                // words: [chunk][word-row j]
  GroupRaw q[UNROLL][128 / GROUP];   // per chunk, per group
};

template <int GROUP, int UNROLL>
DEV void load_stage(Stage<GROUP, UNROLL>& st, const uint4* __restrict__ wp, const uint4* __restrict__ sz,
                    const u32* __restrict__ zp, int c, int c_last, int N, int n0) {
#pragma unroll
  for (int u = 0; u < UNROLL; u++) {
    const int cc = min(c + u, c_last);  // past the split's end: re-read its last chunk (not computed)
#pragma unroll
    for (int j = 0; j < 4; j++) st.w[u][j] = ld_stream(wp + (size_t)(16 * cc + j) * 8);
#pragma unroll
    for (int gi = 0; gi < 128 / GROUP; gi++) st.q[u][gi] = load_group(sz, zp, cc * (128 / GROUP) + gi, N, n0);
  }
}

// The thread's activation pairs of chunk c: xt[t] = slice t's pairs of its four word-rows (xp: + r0 or + c).
DEV void load_pairs(const uint4* __restrict__ xp, int c, uint4 xt[4]) {
#pragma unroll
  for (int t = 0; t < 4; t++) xt[t] = ld_nc(xp + c * 16 + 4 * t);
}

template <int GROUP, int UNROLL, int FLUSH>
DEV void compute_stage(const Stage<GROUP, UNROLL>& st, const uint4* __restrict__ xp, int c, int c_left,
                       float acc[4]) {
  constexpr int SPG = GROUP / 32;  // slices per group
#pragma unroll
  for (int u = 0; u < UNROLL; u++) {
    if (u < c_left) {
      uint4 xt[4];
      load_pairs(xp, c + u, xt);
      const GroupRaw& q0 = st.q[u][0 / SPG];
      const GroupRaw& q1 = st.q[u][1 / SPG];
      const GroupRaw& q2 = st.q[u][2 / SPG];
      const GroupRaw& q3 = st.q[u][3 / SPG];
#pragma unroll
      for (int i = 0; i < 4; i++) {
        const u32 zs0 = zs_of(q0, i), zf1 = zf_of(q1, i), zs2 = zs_of(q2, i), zf3 = zf_of(q3, i);
        const u32 s0 = s_of(q0, i), s1 = s_of(q1, i), s2 = s_of(q2, i), s3 = s_of(q3, i);
        u32 h = 0;
#pragma unroll
        for (int j = 0; j < 4; j++) {
          u32 d0, d1, d2, d3;
          dequant(pick(st.w[u][j], i), zs0, zf1, zs2, zf3, s0, s1, s2, s3, d0, d1, d2, d3);
          if (j % FLUSH == 0) h = 0;
          h = hfma2(pick(xt[0], j), d0, h);
          h = hfma2(pick(xt[1], j), d1, h);
          h = hfma2(pick(xt[2], j), d2, h);
          h = hfma2(pick(xt[3], j), d3, h);
          if (j % FLUSH == FLUSH - 1) acc[i] += h2_sum(h);
        }
      }
    }
  }
}

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

template <int GROUP, int UNROLL>
DEV void compute_stage_tc(const Stage<GROUP, UNROLL>& st, const uint4* __restrict__ xp, int c, int c_left,
                          float acc[4]) {
  constexpr int SPG = GROUP / 32, NG = 128 / GROUP;
#pragma unroll
  for (int u = 0; u < UNROLL; u++) {
    if (u < c_left) {
      uint4 xt[4];
      load_pairs(xp, c + u, xt);
      u32 d[4][4][4];  // [word-row j][column i][slice t]
#pragma unroll
      for (int j = 0; j < 4; j++) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
          dequant_tc(pick(st.w[u][j], i), zsub_of(st.q[u][0 / SPG], i), nzsub_of(st.q[u][1 / SPG], i),
                     zsub_of(st.q[u][2 / SPG], i), nzsub_of(st.q[u][3 / SPG], i), d[j][i][0], d[j][i][1],
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
          acc[2 * ip] += c0 * scale_of(st.q[u][gi], 2 * ip);
          acc[2 * ip + 1] += c2 * scale_of(st.q[u][gi], 2 * ip + 1);
        }
      }
#endif
    }
  }
}

template <int GROUP, int UNROLL, int FLUSH, bool TC>
DEV void compute(const Stage<GROUP, UNROLL>& st, const uint4* __restrict__ xp, int c, int c_left,
                 float acc[4]) {
  if (TC) {
    compute_stage_tc<GROUP, UNROLL>(st, xp, c, c_left, acc);
  } else {
    compute_stage<GROUP, UNROLL, FLUSH>(st, xp, c, c_left, acc);
  }
}

// The tile's column sums, then the splits. KSPLIT warps a column block each hold the partial of their part of
// the split's chunks; they meet in shared memory in k-part order (thread t < T then holds column t). The
// splits (gridDim.y) meet as REDUCE says: 0 red.global.add into the float32 `out`; 1 / 2 in split order
// through the workspace ws (float32 [tiles, splits, T]) and the counters cnt (int32 [tiles], zero before and
// after; with one split neither is touched), the last CTA of a tile writing fp16 `y` (2: silu(gate) * up).
template <int WARPS, int KSPLIT, int REDUCE, bool TC>
DEV void finish(float acc[4], float* __restrict__ out, u16* __restrict__ y, float* __restrict__ ws,
                int* __restrict__ cnt, int N) {
  constexpr int T = 32 * WARPS;  // columns of a tile
  __shared__ __align__(16) float part[KSPLIT * T];  // float4 stores
  __shared__ float tile_v[REDUCE == 2 ? T : 1];
  __shared__ int last;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int cb = warp % WARPS, kp = warp / WARPS;
  const int cq = TC ? lane >> 2 : lane & 7;  // column quad
  const bool writer = TC ? (lane & 3) == 0 : lane < 8;
  const int b = blockIdx.x * WARPS + cb;
  if (!TC) {
#pragma unroll
    for (int i = 0; i < 4; i++) {
      acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], 8);
      acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], 16);
    }
  }
  if (KSPLIT == 1 && REDUCE == 0) {  // one partial a column: straight to the output
    if (writer && b * 32 < N) {
      float* p = out + b * 32 + 4 * cq;
      asm volatile("red.relaxed.gpu.global.add.v4.f32 [%0], {%1, %2, %3, %4};"
                   :: "l"(p), "f"(acc[0]), "f"(acc[1]), "f"(acc[2]), "f"(acc[3]) : "memory");
    }
    return;
  }
  if (writer) {
    float4* p = reinterpret_cast<float4*>(part + kp * T + cb * 32 + 4 * cq);
    *p = make_float4(acc[0], acc[1], acc[2], acc[3]);
  }
  __syncthreads();
  const int t = threadIdx.x, tile = blockIdx.x, col0 = tile * T;
  float s = 0.f;
  if (t < T) {
#pragma unroll
    for (int k = 0; k < KSPLIT; k++) s += part[k * T + t];
  }
  if (REDUCE == 0) {
    if (t < T && col0 + t < N) {
      asm volatile("red.relaxed.gpu.global.add.f32 [%0], %1;" :: "l"(out + col0 + t), "f"(s) : "memory");
    }
    return;
  }
  const int splits = gridDim.y;
  if (splits > 1) {
    float* base = ws + (size_t)tile * splits * T;
    if (t < T) base[blockIdx.y * T + t] = s;
    __threadfence();
    __syncthreads();
    if (t == 0) {
      int prev;
      asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], 1;" : "=r"(prev) : "l"(cnt + tile) : "memory");
      last = prev == splits - 1;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    // the last CTA of this tile: column t summed in split order (deterministic)
    s = 0.f;
    if (t < T) {
      for (int k = 0; k < splits; k++) s += __ldcg(base + k * T + t);
    }
    if (t == 0) cnt[tile] = 0;
  }
  if (REDUCE == 1) {
    if (t < T && col0 + t < N) y[col0 + t] = f32_to_f16(s);
  } else {
    // interleaved gate/up: 32-column blocks [g, u, g, u, ...]; output o of the tile: pair o / 32, column
    // o % 32
    if (t < T) tile_v[t] = f16_to_f32(f32_to_f16(s));  // the GEMM output rounded to fp16
    __syncthreads();
    const int p = t / 32, c = t % 32;
    if (t < T / 2 && col0 + 64 * p < N) {
      const float g = tile_v[64 * p + c], u = tile_v[64 * p + 32 + c];
      const float sg = f16_to_f32(f32_to_f16(g / (1.0f + expf(-g))));  // as kernels/fused.py silu_mul
      y[tile * (T / 2) + t] = f32_to_f16(sg * u);
    }
  }
}

// grid (ceil(N / (32 * WARPS)), splits), 32 * WARPS * KSPLIT threads; `per` chunks a split, of which warp
// w's k-part (w / WARPS) takes an equal share.
template <int GROUP, int UNROLL, int FLUSH, int REDUCE, bool PRELOAD, bool PIPE, int WARPS, bool TC,
          int KSPLIT>
__global__ void __launch_bounds__(32 * WARPS * KSPLIT) w4a16_gemv(
    const uint4* __restrict__ x, const uint4* __restrict__ qw, const uint4* __restrict__ sz,
    const u32* __restrict__ zp, float* __restrict__ out, u16* __restrict__ y, float* __restrict__ ws,
    int* __restrict__ cnt, int N, int KW, int n_chunks, int per) {
  static_assert(REDUCE != 2 || WARPS % 2 == 0, "the SiLU epilogue needs gate/up block pairs in a tile");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int cb = warp % WARPS, kp = warp / WARPS;
  const int r0 = TC ? lane & 3 : lane >> 3, cq = TC ? lane >> 2 : lane & 7;  // word-row quad, column quad
  const int b = min(blockIdx.x * WARPS + cb, N / 32 - 1);  // a warp past N computes a copy, never stored
  const int n0 = b * 32 + 4 * cq;
  const int s_lo = blockIdx.y * per, s_hi = min(s_lo + per, n_chunks);
  const int per_k = (s_hi - s_lo + KSPLIT - 1) / KSPLIT;
  const int c_lo = s_lo + kp * per_k;
  const int c_hi = min(c_lo + per_k, s_hi);
  const uint4* wp = qw + (size_t)b * KW * 8 + (4 * r0) * 8 + cq;
  const uint4* xp = x + r0;  // + 16 c + 4 t: pairs 64 c + 16 t + 4 r0 .. + 3

  Stage<GROUP, UNROLL> cur;
  if (PRELOAD && c_lo < c_hi) load_stage<GROUP, UNROLL>(cur, wp, sz, zp, c_lo, c_hi - 1, N, n0);
  pdl_wait();
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  if (!PRELOAD && c_lo < c_hi) load_stage<GROUP, UNROLL>(cur, wp, sz, zp, c_lo, c_hi - 1, N, n0);
  for (int c = c_lo; c < c_hi; c += UNROLL) {
    const bool more = c + UNROLL < c_hi;
    if (PIPE) {  // the next iteration's loads in flight while this one computes
      Stage<GROUP, UNROLL> nxt;
      if (more) load_stage<GROUP, UNROLL>(nxt, wp, sz, zp, c + UNROLL, c_hi - 1, N, n0);
      compute<GROUP, UNROLL, FLUSH, TC>(cur, xp, c, c_hi - c, acc);
      if (more) cur = nxt;
    } else {
      compute<GROUP, UNROLL, FLUSH, TC>(cur, xp, c, c_hi - c, acc);
      if (more) load_stage<GROUP, UNROLL>(cur, wp, sz, zp, c + UNROLL, c_hi - 1, N, n0);
    }
  }
  pdl_trigger();
  finish<WARPS, KSPLIT, REDUCE, TC>(acc, out, y, ws, cnt, N);
}
