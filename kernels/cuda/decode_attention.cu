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

DEV void unpack8(const uint4& v, float f[8]) {  // 8 fp16 -> float
  lo_hi(v.x, f[0], f[1]);
  lo_hi(v.y, f[2], f[3]);
  lo_hi(v.z, f[4], f[5]);
  lo_hi(v.w, f[6], f[7]);
}

DEV u32 cluster_rank() {
  u32 r;
  asm("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}

DEV void cluster_sync() {  // every thread of every CTA of the cluster; shared-memory writes before it visible
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

// N softmax states (running max m, sum l, weighted sums acc) of head h merged at dim d: the max, and l and
// acc[d] rescaled to it and summed (states without keys, m = -inf, weigh 0).
template <int N, int G, int D>
DEV void merge(const float (&m)[N][G], const float (&l)[N][G], const float (&acc)[N][G][D], int h, int d,
               float& mx, float& tot, float& a) {
  mx = m[0][h];
#pragma unroll
  for (int i = 1; i < N; i++) mx = fmaxf(mx, m[i][h]);
  const float mu = mx == NEG_INF ? 0.f : mx;
  a = tot = 0.f;
#pragma unroll
  for (int i = 0; i < N; i++) {
    const float wt = ex2(m[i][h] - mu);
    a += wt * acc[i][h][d];
    tot += wt * l[i][h];
  }
}

template <bool C>
struct ActT {
  typedef u16 T;  // fp16 q, k, v
};
template <>
struct ActT<true> {
  typedef float T;  // a float32 split-K accumulator (consumed: zeroed here)
};

// Rotated 8 dims [e, e + 8) of a head row (fp16 values as float): x = the row, e's partner half at e +- D/2,
// rounded as kernels/fused.py's rotate_halves: o = f16(f16(x c) -+ f16(x' s)) with the cos / sin of dim e.
template <int D, typename AT>
DEV void rotate8(const AT* row, int e, const float c[8], const float s[8], float o[8]) {
  constexpr int H = D / 2;
  const bool lower = e < H;
  const int p = lower ? e + H : e - H;
#pragma unroll
  for (int j = 0; j < 8; j++) {
    const float x = act(row, e + j), xp = act(row, p + j);
    o[j] = round_f16(round_f16(x * c[j]) + round_f16((lower ? -xp : xp) * s[j]));
  }
}

DEV u32 pack2(float lo, float hi) { return (u32)f32_to_f16(lo) | ((u32)f32_to_f16(hi) << 16); }
DEV uint4 pack8(const float o[8]) {
  return make_uint4(pack2(o[0], o[1]), pack2(o[2], o[3]), pack2(o[4], o[5]), pack2(o[6], o[7]));
}

DEV void st_cluster(float* p, u32 rank, float v) {  // `p` (shared memory) in CTA `rank` of the cluster
  u32 local, remote;
  asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(local) : "l"(p));
  asm("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(rank));
  asm volatile("st.shared::cluster.f32 [%0], %1;" ::"r"(remote), "f"(v) : "memory");
}

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
  constexpr int LPK = D / 8, KPW = 32 / LPK, KPR = WARPS * KPW, R = STAGE / KPR;
  __shared__ float wm[WARPS][G], wl[WARPS][G];
  __shared__ float wacc[WARPS][G][D];
  __shared__ float pm[S][G], pl[S][G], pacc[S][G][D];  // rank 0's: every split's state, pushed there

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
  float cs[8], sn[8];  // the rotary's cos / sin of this thread's dims
#pragma unroll
  for (int j = 0; j < 8; j++) {
    cs[j] = f16_to_f32(cos[(size_t)b * sc_t + 8 * dl + j]);
    sn[j] = f16_to_f32(sin[(size_t)b * ss_t + 8 * dl + j]);
  }
  // The new key sits in the last stage (it is the last key): row r_new of the LPK lanes holding it.
  const bool has_new = kv_lo <= p_new && p_new < kv_hi;
  const int last_base = kv_lo + (max(kv_hi - 1 - kv_lo, 0) / STAGE) * STAGE, off = p_new - last_base;
  const bool holds_new = has_new && (off % KPR) / KPW == warp && off % KPW == kg;
  const int r_new = off / KPR;

  pdl_wait();
  // q and the new k, rounded as the GEMM's fp16 output, rotated as kernels/fused.py's rotate_halves
  const AT* qrow = q + (size_t)b * sq_t + (size_t)hk * G * sq_h;
  const AT* krow = kn + (size_t)b * sk_t + (size_t)hk * sk_h;
  const AT* vrow = vn + (size_t)b * sv_t + (size_t)hk * sv_h;
  float qf[G][8];
#pragma unroll
  for (int h = 0; h < G; h++) rotate8<D>(qrow + (size_t)h * sq_h, 8 * dl, cs, sn, qf[h]);
  uint4 k_new, v_new;
  if (holds_new) {  // this step's key and value: into the cache (as kernels/kv_cache.py's write_kv), and kept
    float o[8], v8[8];
    rotate8<D>(krow, 8 * dl, cs, sn, o);
#pragma unroll
    for (int j = 0; j < 8; j++) v8[j] = act(vrow, 8 * dl + j);
    k_new = pack8(o);
    v_new = pack8(v8);
    const long long slot = SLOT64 ? static_cast<const long long*>(slots)[b] : static_cast<const int*>(slots)[b];
    if (slot >= 0 && slot < num_slots) {
      const size_t at = ((size_t)slot * Hk + hk) * D + 8 * dl;
      *reinterpret_cast<uint4*>(k_cache + at) = k_new;
      *reinterpret_cast<uint4*>(v_cache + at) = v_new;
    }
  }

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
    const bool new_here = holds_new && base == last_base;
    float s[R][G];
#pragma unroll
    for (int r = 0; r < R; r++) {
      const bool is_new = new_here && r == r_new;
      if (is_new) {  // not read back from the cache
        kr[r] = k_new;
        vr[r] = v_new;
      }
      float k8[8];
      unpack8(kr[r], k8);
#pragma unroll
      for (int h = 0; h < G; h++) {
        float dot = 0.f;
#pragma unroll
        for (int j = 0; j < 8; j++) dot += qf[h][j] * k8[j];
#pragma unroll
        for (int o = LPK / 2; o >= 1; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
        // is_new of any lane of the key: the LPK lanes of a key hold the same flags
        s[r][h] = (ok >> r & 1u) || is_new ? dot * qk_scale : NEG_INF;
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
      unpack8(vr[r], v8);
#pragma unroll
      for (int h = 0; h < G; h++)
#pragma unroll
        for (int j = 0; j < 8; j++) acc[h][j] += s[r][h] * v8[j];
    }
  }

  // the warps' states -> this split's (m, l, acc), pushed into rank 0's shared memory
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
    float mx, tot, a;
    merge<WARPS>(wm, wl, wacc, h, d, mx, tot, a);
    st_cluster(&pacc[split][h][d], 0, a);
    if (d == 0) {
      st_cluster(&pm[split][h], 0, mx);
      st_cluster(&pl[split][h], 0, tot);
    }
  }
  cluster_sync();  // the pushes have landed; every split has read q, k and v
  if (cluster_rank() != 0) return;
  for (int i = tid; i < G * D; i += THREADS) {
    const int h = i / D, d = i % D;
    float mx, tot, a;
    merge<S>(pm, pl, pacc, h, d, mx, tot, a);
    out[(size_t)b * so_t + (size_t)(hk * G + h) * so_h + d] = f32_to_f16(tot > 0.f ? a / tot : 0.f);
  }
  if (CONSUME) {  // zero the accumulator's q, k and v for the GEMM's next launch
    float* zq = const_cast<float*>(reinterpret_cast<const float*>(qrow));
    float* zk = const_cast<float*>(reinterpret_cast<const float*>(krow));
    float* zv = const_cast<float*>(reinterpret_cast<const float*>(vrow));
    for (int i = tid; i < (G + 2) * D; i += THREADS) {
      const int h = i / D, d = i % D;
      if (h < G) {
        zq[(size_t)h * sq_h + d] = 0.f;
      } else {
        (h == G ? zk : zv)[d] = 0.f;
      }
    }
  }
}
