// Decode attention over the paged fp16 KV cache with this step's K/V in hand (kernels/attention_cuda.py):
// the rotary of q and the new k, the new row's store, split-KV attention and the merge of the splits, in one
// launch. Semantics of kernels/paged_attention.py's decode kernel with `new_kv` (and `consume`).
//
// Grid (S, B * Hk), 128 threads; the S splits of a (sequence, KV head) form one thread-block cluster. A split
// takes 1/S of the context's keys (whole 16-key pieces), 64 keys a stage: lane `LPK * kg + dl` of warp w holds
// dims 8 dl .. 8 dl + 7 of key `r * KPR + w * KPW + kg` of the stage for each row r (16-byte loads), so a key
// is LPK lanes (their dot products meet by shuffles) and the G query heads of the KV head share every load.
//
// Programmatic dependent launch: the block table, the cached keys and values of the first stage (older than
// this step, so written by kernels long finished: the previous kernel, a GEMV, triggers only after its own
// wait) and the rotary's cos / sin are read before griddepcontrol.wait; q, k and v (the previous kernel's
// output) after it. The splits' partial softmax states meet in distributed shared memory (one cluster
// barrier), not through global memory and a counter.

#include "common.cuh"

constexpr int WARPS = 4, THREADS = 32 * WARPS, STAGE = 64, PIECE = 16;
#define NEG_INF (-__int_as_float(0x7f800000))

DEV float round_f16(float f) { return f16_to_f32(f32_to_f16(f)); }
DEV float act(const float* p, int i) { return round_f16(__ldcg(p + i)); }  // a split-K sum, as fp16 output
DEV float act(const u16* p, int i) { return f16_to_f32(__ldcg(p + i)); }

DEV float ex2(float x) {  // 2^x (ex2.approx, as Triton's exp2); 2^-inf = 0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

DEV void lo_hi(u32 h2, float& lo, float& hi) {
  lo = f16_to_f32((u16)(h2 & 0xFFFFu));
  hi = f16_to_f32((u16)(h2 >> 16));
}

DEV u32 cluster_rank() {
  u32 r;
  asm("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}

DEV void cluster_sync() {  // every thread of every CTA of the cluster; shared-memory writes before it visible
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

DEV float ld_cluster(const float* p, u32 rank) {  // `p` (shared memory) in CTA `rank` of the cluster
  u32 local, remote;
  asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(local) : "l"(p));
  asm("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(rank));
  float v;
  asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(remote) : "memory");
  return v;
}

template <bool C>
struct ActT {
  typedef u16 T;  // fp16 q, k, v
};
template <>
struct ActT<true> {
  typedef float T;  // a float32 split-K accumulator (consumed: zeroed here)
};

// D head dim (64 or 128), G query heads a KV head (1..4), S splits = cluster size (1..8), CONSUME q/k/v
// float32 accumulators, SLOT64 int64 slot mapping.
template <int D, int G, int S, bool CONSUME, bool SLOT64>
__global__ void __cluster_dims__(S, 1, 1) __launch_bounds__(THREADS) decode_attn(
    const typename ActT<CONSUME>::T* __restrict__ q, const typename ActT<CONSUME>::T* __restrict__ kn,
    const typename ActT<CONSUME>::T* __restrict__ vn, int sq_t, int sq_h, int sk_t, int sk_h, int sv_t,
    int sv_h, const u16* __restrict__ cos, const u16* __restrict__ sin, int sc_t, int ss_t,
    u16* __restrict__ k_cache, u16* __restrict__ v_cache, const void* __restrict__ slots, int num_slots,
    const int* __restrict__ tables, int stride_bt, int max_blocks, const int* __restrict__ lens,
    u16* __restrict__ out, int so_t, int so_h, int Hk, int page_shift, float qk_scale) {
  typedef typename ActT<CONSUME>::T AT;
  constexpr int LPK = D / 8, KPW = 32 / LPK, KPR = WARPS * KPW, R = STAGE / KPR, H = D / 2;
  __shared__ float qs[G][D];
  __shared__ __align__(16) u16 kns[D];
  __shared__ __align__(16) u16 vns[D];
  __shared__ float wm[WARPS][G], wl[WARPS][G];
  __shared__ float wacc[WARPS][G][D];
  __shared__ float cm[G], cl[G], cacc[G][D];  // this split's state, read by the whole cluster

  pdl_trigger();
  const int split = blockIdx.x, b = blockIdx.y / Hk, hk = blockIdx.y % Hk;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, kg = lane / LPK, dl = lane % LPK;
  const int seq_len = min(lens[b], max_blocks << page_shift);
  const int kv_end = max(seq_len, 0), p_new = seq_len - 1;  // the new token's key position
  const int per = ((kv_end + S - 1) / S + PIECE - 1) / PIECE * PIECE;
  const int kv_lo = split * per, kv_hi = min(kv_lo + per, kv_end);
  const int* table = tables + (size_t)b * stride_bt;
  const int pmask = (1 << page_shift) - 1;

  uint4 kr[R], vr[R];
  u32 ok = 0;  // bit r: row r's key is cached (not the new one), in range and mapped
  auto load_stage = [&](int base) {
    ok = 0;
#pragma unroll
    for (int r = 0; r < R; r++) {
      const int key = base + r * KPR + warp * KPW + kg;
      const int blk = key < kv_hi && key < p_new ? table[key >> page_shift] : -1;
      kr[r] = vr[r] = make_uint4(0, 0, 0, 0);
      if (blk >= 0) {
        const size_t at = (((size_t)blk << page_shift) + (key & pmask)) * Hk * D + (size_t)hk * D + 8 * dl;
        kr[r] = ld_nc(reinterpret_cast<const uint4*>(k_cache + at));
        vr[r] = ld_nc(reinterpret_cast<const uint4*>(v_cache + at));
        ok |= 1u << r;
      }
    }
  };
  load_stage(kv_lo);
  float c1[2], c2[2], s1[2], s2[2];  // the rotary's cos / sin of this thread's items (below)
#pragma unroll
  for (int u = 0; u < 2; u++) {
    const int d = (tid + u * THREADS) % H;
    c1[u] = f16_to_f32(cos[(size_t)b * sc_t + d]);
    c2[u] = f16_to_f32(cos[(size_t)b * sc_t + d + H]);
    s1[u] = f16_to_f32(sin[(size_t)b * ss_t + d]);
    s2[u] = f16_to_f32(sin[(size_t)b * ss_t + d + H]);
  }

  pdl_wait();
  // q and the new k, rounded as the GEMM's fp16 output, rotated as kernels/fused.py's rotate_halves
  const AT* qrow = q + (size_t)b * sq_t + (size_t)hk * G * sq_h;
  const AT* krow = kn + (size_t)b * sk_t + (size_t)hk * sk_h;
  const AT* vrow = vn + (size_t)b * sv_t + (size_t)hk * sv_h;
  for (int i = tid, u = 0; i < (G + 1) * H; i += THREADS, u++) {
    const int hh = i / H, d = i % H;
    const AT* src = hh < G ? qrow + (size_t)hh * sq_h : krow;
    const float x1 = act(src, d), x2 = act(src, d + H);
    const float cc1 = u < 2 ? c1[u] : f16_to_f32(cos[(size_t)b * sc_t + d]);
    const float cc2 = u < 2 ? c2[u] : f16_to_f32(cos[(size_t)b * sc_t + d + H]);
    const float ss1 = u < 2 ? s1[u] : f16_to_f32(sin[(size_t)b * ss_t + d]);
    const float ss2 = u < 2 ? s2[u] : f16_to_f32(sin[(size_t)b * ss_t + d + H]);
    const u16 o1 = f32_to_f16(round_f16(x1 * cc1) + round_f16(-x2 * ss1));
    const u16 o2 = f32_to_f16(round_f16(x2 * cc2) + round_f16(x1 * ss2));
    if (hh < G) {
      qs[hh][d] = f16_to_f32(o1);
      qs[hh][d + H] = f16_to_f32(o2);
    } else {
      kns[d] = o1;
      kns[d + H] = o2;
    }
  }
  for (int d = tid; d < D; d += THREADS) vns[d] = f32_to_f16(act(vrow, d));
  __syncthreads();
  const bool has_new = kv_lo <= p_new && p_new < kv_hi;
  if (has_new && tid < D / 8) {  // the new row into the cache, as kernels/kv_cache.py's write_kv
    const long long slot = SLOT64 ? static_cast<const long long*>(slots)[b] : static_cast<const int*>(slots)[b];
    if (slot >= 0 && slot < num_slots) {
      const size_t at = ((size_t)slot * Hk + hk) * D + 8 * tid;
      *reinterpret_cast<uint4*>(k_cache + at) = *reinterpret_cast<const uint4*>(kns + 8 * tid);
      *reinterpret_cast<uint4*>(v_cache + at) = *reinterpret_cast<const uint4*>(vns + 8 * tid);
    }
  }

  float qf[G][8];
#pragma unroll
  for (int h = 0; h < G; h++)
#pragma unroll
    for (int j = 0; j < 8; j++) qf[h][j] = qs[h][8 * dl + j];
  float m[G], l[G], acc[G][8];
#pragma unroll
  for (int h = 0; h < G; h++) {
    m[h] = NEG_INF;
    l[h] = 0.f;
#pragma unroll
    for (int j = 0; j < 8; j++) acc[h][j] = 0.f;
  }
  for (int base = kv_lo; base < kv_hi; base += STAGE) {
    if (base != kv_lo) load_stage(base);
    float s[R][G];
#pragma unroll
    for (int r = 0; r < R; r++) {
      const int key = base + r * KPR + warp * KPW + kg;
      const bool is_new = key == p_new && has_new;
      if (is_new) {  // this step's key and value, from shared memory (not read back from the cache)
        kr[r] = *reinterpret_cast<const uint4*>(kns + 8 * dl);
        vr[r] = *reinterpret_cast<const uint4*>(vns + 8 * dl);
      }
      float k8[8];
      lo_hi(kr[r].x, k8[0], k8[1]);
      lo_hi(kr[r].y, k8[2], k8[3]);
      lo_hi(kr[r].z, k8[4], k8[5]);
      lo_hi(kr[r].w, k8[6], k8[7]);
#pragma unroll
      for (int h = 0; h < G; h++) {
        float dot = 0.f;
#pragma unroll
        for (int j = 0; j < 8; j++) dot += qf[h][j] * k8[j];
#pragma unroll
        for (int o = LPK / 2; o >= 1; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
        s[r][h] = is_new || (ok >> r & 1u) ? dot * qk_scale : NEG_INF;
      }
    }
#pragma unroll
    for (int h = 0; h < G; h++) {
      float mx = s[0][h];
#pragma unroll
      for (int r = 1; r < R; r++) mx = fmaxf(mx, s[r][h]);
#pragma unroll
      for (int o = LPK; o < 32; o <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const float m_new = fmaxf(m[h], mx);
      const float m_use = m_new == NEG_INF ? 0.f : m_new;  // no key yet: no NaN
      const float alpha = ex2(m[h] - m_use);
      float psum = 0.f;
#pragma unroll
      for (int r = 0; r < R; r++) {
        s[r][h] = ex2(s[r][h] - m_use);
        psum += s[r][h];
      }
#pragma unroll
      for (int o = LPK; o < 32; o <<= 1) psum += __shfl_xor_sync(0xffffffffu, psum, o);
      l[h] = l[h] * alpha + psum;
#pragma unroll
      for (int j = 0; j < 8; j++) acc[h][j] *= alpha;
      m[h] = m_new;
    }
#pragma unroll
    for (int r = 0; r < R; r++) {
      float v8[8];
      lo_hi(vr[r].x, v8[0], v8[1]);
      lo_hi(vr[r].y, v8[2], v8[3]);
      lo_hi(vr[r].z, v8[4], v8[5]);
      lo_hi(vr[r].w, v8[6], v8[7]);
#pragma unroll
      for (int h = 0; h < G; h++)
#pragma unroll
        for (int j = 0; j < 8; j++) acc[h][j] += s[r][h] * v8[j];
    }
  }

  // the warps' states -> this split's (m, l, acc) in shared memory
#pragma unroll
  for (int h = 0; h < G; h++)
#pragma unroll
    for (int j = 0; j < 8; j++)
#pragma unroll
      for (int o = LPK; o < 32; o <<= 1) acc[h][j] += __shfl_xor_sync(0xffffffffu, acc[h][j], o);
  if (kg == 0) {
#pragma unroll
    for (int h = 0; h < G; h++)
#pragma unroll
      for (int j = 0; j < 8; j++) wacc[warp][h][8 * dl + j] = acc[h][j];
  }
  if (lane == 0) {
#pragma unroll
    for (int h = 0; h < G; h++) {
      wm[warp][h] = m[h];
      wl[warp][h] = l[h];
    }
  }
  __syncthreads();
  for (int i = tid; i < G * D; i += THREADS) {
    const int h = i / D, d = i % D;
    float mx = wm[0][h];
#pragma unroll
    for (int w = 1; w < WARPS; w++) mx = fmaxf(mx, wm[w][h]);
    const float mu = mx == NEG_INF ? 0.f : mx;
    float a = 0.f, tot = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; w++) {
      const float wt = ex2(wm[w][h] - mu);
      a += wt * wacc[w][h][d];
      tot += wt * wl[w][h];
    }
    cacc[h][d] = a;
    if (d == 0) {
      cm[h] = mx;
      cl[h] = tot;
    }
  }

  // the cluster's splits meet: CTA `rank` merges items rank * THREADS + tid, + S * THREADS, ...
  cluster_sync();
  const u32 rank = cluster_rank();
  for (int i = rank * THREADS + tid; i < G * D; i += S * THREADS) {
    const int h = i / D, d = i % D;
    float ms[S];
    float mx = NEG_INF;
#pragma unroll
    for (int sp = 0; sp < S; sp++) {
      ms[sp] = ld_cluster(&cm[h], sp);
      mx = fmaxf(mx, ms[sp]);
    }
    const float mu = mx == NEG_INF ? 0.f : mx;  // splits without keys weigh 0
    float a = 0.f, tot = 0.f;
#pragma unroll
    for (int sp = 0; sp < S; sp++) {
      const float wt = ex2(ms[sp] - mu);
      a += wt * ld_cluster(&cacc[h][d], sp);
      tot += wt * ld_cluster(&cl[h], sp);
    }
    out[(size_t)b * so_t + (size_t)(hk * G + h) * so_h + d] = f32_to_f16(tot > 0.f ? a / tot : 0.f);
  }
  if (CONSUME) {  // every split has read q, k and v (before the cluster barrier): zero them for the GEMM
    float* zq = const_cast<float*>(reinterpret_cast<const float*>(qrow));
    float* zk = const_cast<float*>(reinterpret_cast<const float*>(krow));
    float* zv = const_cast<float*>(reinterpret_cast<const float*>(vrow));
    for (int i = rank * THREADS + tid; i < (G + 2) * D; i += S * THREADS) {
      const int h = i / D, d = i % D;
      if (h < G) {
        zq[(size_t)h * sq_h + d] = 0.f;
      } else {
        (h == G ? zk : zv)[d] = 0.f;
      }
    }
  }
  cluster_sync();  // no CTA leaves while another still reads its shared memory
}
