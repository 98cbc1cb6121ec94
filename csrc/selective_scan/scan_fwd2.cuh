// Selective scan forward, fwd2: the layout for grids that fill the GPU (batch > 1).
//
// A block covers cpb channels of one batch row with 4 lanes per channel (tid = 4c + l);
// lane l owns the states 16k + 4l + {0..3} of each 16-state slot k (k < spl). Time runs in
// sub-chunks of 16 steps. For each sub-chunk the block stages, in shared memory and as
// fp32, B and C transposed to [step][state] (shared by all channels of the block) and
// dt, dt*u per channel (lane l computes steps 4l..4l+3 of its channel, and later writes
// those steps of the output). Staging is double-buffered: the global loads of sub-chunk
// i+1 are issued before sub-chunk i is computed, and stored after it.
// Per step a lane does 4 exponentials (ex2.approx, A pre-scaled by log2 e) and 16 FMA-type
// operations; the sum over states is a 4-lane transposing butterfly once per sub-chunk.
// kFull (fwd2_full), Mamba's case: every sub-chunk whole, every row 16-byte aligned, dstate a
// multiple of 16, z given, delta through the default softplus. No load, store or step then needs
// a bounds check or a branch on the options (forward 6-11% faster on an H200,
// docs/selective_scan.md).
// kD16 (fwd2_d16), Mamba's shape on top of kFull: dstate 16 and 16-channel blocks, so the state
// slot count, shared-memory layout and block size are constants and the state stays in registers
// between sub-chunks.
// kSeq (scan_common.cuh), packed sequences: lane l also loads seq_idx at steps 4l-1..4l+3 of the
// next sub-chunk; its starts (one 16-bit mask per block: one batch row) zero the state before
// those steps' updates (kSeqLast: after storing it as the previous sequence's final state).
#pragma once

#include "scan_common.cuh"

namespace ssm {

template <typename T, typename TW>
struct Fwd2Stage {
  static constexpr int kPre = 1;  // B/C units per thread held in registers (prefetched)
  RawN<TW, 8> bc[kPre];
  RawN<T, 4> u4, d4, z4;
  SeqRun<4> sq;  // (packed sequences only)
};

template <typename T, typename TW, bool kFull, bool kD16, int kSeq>
__global__ void __launch_bounds__(64, kFwd2MinBlocks) scan_fwd2_kernel(const ScanParams p) {
  static_assert(kFull || !kD16, "kD16 specializes kFull");
  constexpr bool kPacked = kSeq != kSeqOff, kLast = kSeq == kSeqLast;
  extern __shared__ float4 smem_f4[];
  float* sm = reinterpret_cast<float*>(smem_f4);
  const int nthr = kD16 ? 64 : blockDim.x;
  const int tid = threadIdx.x;
  const int l = tid & 3;
  const int c = tid >> 2;
  const int cpb = kD16 ? 16 : p.cpb;
  const int b = blockIdx.y;
  const int d = blockIdx.x * cpb + c;
  const int L = p.seqlen, N = kD16 ? 16 : p.dstate, spl = kD16 ? 1 : p.spl;
  const int N16 = spl * 16, BW = N16 + 4;
  const int g = d / (p.dim / p.groups);
  const unsigned mask = nthr >= 32 ? 0xffffffffu : ((1u << nthr) - 1u);

  float* sBC = sm;                                           // [2 buf][2 B/C][16][BW]
  float* sDT = sBC + 2 * 2 * 16 * BW;                        // [2 buf][cpb][2 dt/dtu][20]
  float4* sH = reinterpret_cast<float4*>(sDT + 2 * cpb * 2 * 20);  // [spl][nthr]

  const T* up = static_cast<const T*>(p.u) + b * p.u_b + d * p.u_d;
  const T* dp = static_cast<const T*>(p.delta) + b * p.dl_b + d * p.dl_d;
  const T* zp = p.z ? static_cast<const T*>(p.z) + b * p.z_b + d * p.z_d : nullptr;
  const TW* Bb = static_cast<const TW*>(p.B) + b * p.B_b + g * p.B_g;
  const TW* Cb = static_cast<const TW*>(p.C) + b * p.C_b + g * p.C_g;
  T* outp = static_cast<T*>(p.out) + ((int64_t)b * p.dim + d) * L;
  T* yp = p.y ? static_cast<T*>(p.y) + ((int64_t)b * p.dim + d) * L : nullptr;
  const float* Ap = p.A + (int64_t)d * N;
  const float bias = p.bias ? p.bias[d] : 0.f;
  const float Dv = p.D ? p.D[d] : 0.f;
  float* ckp = p.ckpt ? p.ckpt + ((int64_t)b * p.dim + d) * p.nseg * N : nullptr;
  const int nunits = 4 * N16;  // (B|C) x state x half of the 16 steps, 8 elements each
  const int* sip = kPacked ? p.seq_idx + b * p.si_b : nullptr;
  unsigned bnd = 0;  // kPacked: the sequence starts of the sub-chunk committed last (bit i: step i)

  auto loadA2 = [&](int k) {
    const int s0 = 16 * k + 4 * l;
    float4 a;
    a.x = s0 + 0 < N ? Ap[s0 + 0] * kLog2e : 0.f;
    a.y = s0 + 1 < N ? Ap[s0 + 1] * kLog2e : 0.f;
    a.z = s0 + 2 < N ? Ap[s0 + 2] * kLog2e : 0.f;
    a.w = s0 + 3 < N ? Ap[s0 + 3] * kLog2e : 0.f;
    return a;
  };
  auto unit_row = [&](int e, int& which, int& n, int& half) {
    which = e >= 2 * N16;
    const int rem = e - which * 2 * N16;
    n = rem >> 1;
    half = rem & 1;
  };
  auto prefetch = [&](Fwd2Stage<T, TW>& st, int ch) {
    const int t0 = ch << 4;
#pragma unroll
    for (int r = 0; r < Fwd2Stage<T, TW>::kPre; ++r) {
      const int e = tid + r * nthr;
      if (kD16 || e < nunits) {  // kD16: one unit per thread exactly
        int which, n, half;
        unit_row(e, which, n, half);
        const TW* row = (which ? Cb + (int64_t)n * p.C_s : Bb + (int64_t)n * p.B_s);
        load_n<kFull>(st.bc[r], row, t0 + 8 * half, L, n < N, which ? p.vec_C : p.vec_B);
      }
    }
    const int t = t0 + 4 * l;
    load_n<kFull>(st.u4, up, t, L, true, p.vec_x);
    load_n<kFull>(st.d4, dp, t, L, true, p.vec_x);
    if (kFull || zp) load_n<kFull>(st.z4, zp, t, L, true, p.vec_x);
    if constexpr (kPacked) load_seq(st.sq, sip, t, L);
  };
  float u_cur[4], z_cur[4];
  auto commit = [&](const Fwd2Stage<T, TW>& st, int ch, int buf) {
    const int t0 = ch << 4;
    float* bcb = sBC + buf * 2 * 16 * BW;
#pragma unroll
    for (int r = 0; r < Fwd2Stage<T, TW>::kPre; ++r) {
      const int e = tid + r * nthr;
      if (kD16 || e < nunits) {
        int which, n, half;
        unit_row(e, which, n, half);
        float* dst = bcb + (which * 16 + 8 * half) * BW + n;
#pragma unroll
        for (int i = 0; i < 8; ++i) dst[i * BW] = st.bc[r][i];
      }
    }
    for (int e = tid + Fwd2Stage<T, TW>::kPre * nthr; !kD16 && e < nunits; e += nthr) {  // large dstate
      int which, n, half;
      unit_row(e, which, n, half);
      const TW* row = (which ? Cb + (int64_t)n * p.C_s : Bb + (int64_t)n * p.B_s);
      RawN<TW, 8> tmp;
      load_n<kFull>(tmp, row, t0 + 8 * half, L, n < N, which ? p.vec_C : p.vec_B);
      float* dst = bcb + (which * 16 + 8 * half) * BW + n;
#pragma unroll
      for (int i = 0; i < 8; ++i) dst[i * BW] = tmp[i];
    }
    float dt[4], du[4];
    const int t = t0 + 4 * l;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      u_cur[j] = st.u4[j];
      z_cur[j] = (kFull || zp) ? st.z4[j] : 0.f;
      const float x = st.d4[j] + bias;
      dt[j] = (kFull || t + j < L) ? ((kFull || p.softplus) ? softplusf_(x, !kFull && p.exact_softplus) : x) : 0.f;
      du[j] = dt[j] * u_cur[j];
    }
    float* dtrow = sDT + ((buf * cpb + c) * 2) * 20;
    reinterpret_cast<float4*>(dtrow)[l] = make_float4(dt[0], dt[1], dt[2], dt[3]);
    reinterpret_cast<float4*>(dtrow + 20)[l] = make_float4(du[0], du[1], du[2], du[3]);
    if constexpr (kPacked) bnd = seq_starts16(seq_starts(st.sq, t, L), l, mask);
  };

  // Sequence group of this block (p.nsplit > 1: see ScanParams) and its start state, composed
  // from the zero-start end states of the groups before it.
  const int zg = blockIdx.z;
  const int64_t bd = (int64_t)p.batch * p.dim;
  const int64_t row = (int64_t)b * p.dim + d;
  for (int k = 0; k < spl; ++k) {
    float4 h = make_float4(0.f, 0.f, 0.f, 0.f);
    if (zg > 0) {
      const float4 A2 = loadA2(k);
      for (int zz = 0; zz < zg; ++zz) {
        const float sdt = p.carry_sdt[zz * bd + row];
        const float4 w = load4f_(p.carry_w + (zz * bd + row) * N, 16 * k + 4 * l, N);
        if (kPacked && zz > 0 && seq_start_in_group(p, sip, zz)) h = make_float4(0.f, 0.f, 0.f, 0.f);
        h.x = fmaf(fast_exp2(sdt * A2.x), h.x, w.x);
        h.y = fmaf(fast_exp2(sdt * A2.y), h.y, w.y);
        h.z = fmaf(fast_exp2(sdt * A2.z), h.z, w.z);
        h.w = fmaf(fast_exp2(sdt * A2.w), h.w, w.w);
      }
    }
    sH[k * nthr + tid] = h;
  }
  float4 h_d16 = kD16 ? sH[tid] : make_float4(0.f, 0.f, 0.f, 0.f);  // kD16: the state, instead of sH
  const float4 A2_0 = loadA2(0);
  const int nch = (L + 15) >> 4;
  const int ch_lo = zg * p.gseg * p.R;
  const int ch_end = min(nch, ch_lo + p.gseg * p.R);
  {
    Fwd2Stage<T, TW> st;
    prefetch(st, ch_lo);
    commit(st, ch_lo, ch_lo & 1);
  }
  __syncthreads();

  // checkpoint bookkeeping without a division per sub-chunk: seg = ch / R, r_in_seg = ch % R
  int seg = ch_lo / p.R, r_in_seg = ch_lo % p.R;
  for (int ch = ch_lo; ch < ch_end; ++ch) {
    const int buf = ch & 1;
    const int t0 = ch << 4;
    Fwd2Stage<T, TW> st;
    if (ch + 1 < ch_end) prefetch(st, ch + 1);

    float acc[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) acc[i] = 0.f;
    const bool ck = ckp != nullptr && r_in_seg == 0;
    const float* bB = sBC + (buf * 2 + 0) * 16 * BW;
    const float* bC = sBC + (buf * 2 + 1) * 16 * BW;
    const float4* dt4p = reinterpret_cast<const float4*>(sDT + ((buf * cpb + c) * 2) * 20);
    const float4* du4p = reinterpret_cast<const float4*>(sDT + ((buf * cpb + c) * 2) * 20 + 20);

#pragma unroll 1
    for (int k = 0; k < spl; ++k) {
      const int s0 = 16 * k + 4 * l;
      float4 h = kD16 ? h_d16 : sH[k * nthr + tid];
      if (ck) {
        float* dst = ckp + (int64_t)seg * N + s0;
        if ((N & 3) == 0) {  // 16-byte aligned: one store (4 scalar ones wrote each sector 4 times)
          if (s0 < N) *reinterpret_cast<float4*>(dst) = h;
        } else {
          if (s0 + 0 < N) dst[0] = h.x;
          if (s0 + 1 < N) dst[1] = h.y;
          if (s0 + 2 < N) dst[2] = h.z;
          if (s0 + 3 < N) dst[3] = h.w;
        }
      }
      const float4 A2 = spl == 1 ? A2_0 : loadA2(k);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const float4 dt4 = dt4p[q];
        const float4 du4 = du4p[q];
        const float dts[4] = {dt4.x, dt4.y, dt4.z, dt4.w};
        const float dus[4] = {du4.x, du4.y, du4.z, du4.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = 4 * q + e;
          const float4 Bv = *reinterpret_cast<const float4*>(bB + i * BW + s0);
          const float4 Cv = *reinterpret_cast<const float4*>(bC + i * BW + s0);
          const float dtv = dts[e], duv = dus[e];
          const bool rs = kPacked && ((bnd >> i) & 1u);
          if (kLast && rs) store_seq_last(p, sip, t0 + i, d, N, s0, h);
          h.x = fmaf(rs ? 0.f : fast_exp2(dtv * A2.x), h.x, duv * Bv.x);
          h.y = fmaf(rs ? 0.f : fast_exp2(dtv * A2.y), h.y, duv * Bv.y);
          h.z = fmaf(rs ? 0.f : fast_exp2(dtv * A2.z), h.z, duv * Bv.z);
          h.w = fmaf(rs ? 0.f : fast_exp2(dtv * A2.w), h.w, duv * Bv.w);
          acc[i] = fma4(Cv, h, acc[i]);
        }
      }
      if (kD16) h_d16 = h;
      else sH[k * nthr + tid] = h;
    }

    reduce4_transposing<16>(acc, l, mask);
    {
      float y[4], o[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        y[j] = fmaf(Dv, u_cur[j], acc[j]);
        o[j] = (kFull || zp) ? y[j] * z_cur[j] * sigmoidf_(z_cur[j]) : y[j];
      }
      store_n<kFull>(outp, t0 + 4 * l, L, p.vec_o, o);
      if (yp) store_n<kFull>(yp, t0 + 4 * l, L, p.vec_o, y);
    }
    if (ch + 1 < ch_end) commit(st, ch + 1, buf ^ 1);
    if (++r_in_seg == p.R) {
      r_in_seg = 0;
      ++seg;
    }
    __syncthreads();
  }

  if (zg + 1 < p.nsplit) return;
  float* lastp = p.last + ((int64_t)b * p.dim + d) * N;
  for (int k = 0; k < spl; ++k) store4f_(lastp, 16 * k + 4 * l, N, kD16 ? h_d16 : sH[k * nthr + tid]);
}

// First pass of the sequence-split forward: for group z = blockIdx.z (all but the last), the
// end state of its steps from a zero start, and its sum of dt. Same thread layout as above.
// kD16: fwd2_d16's conditions (constant layout, no bounds checks, the state in registers).
template <typename T, typename TW, bool kD16, bool kPacked>
__global__ void __launch_bounds__(128) scan_fwd2_carry_kernel(const ScanParams p) {
  extern __shared__ float4 smem_f4[];
  float* sm = reinterpret_cast<float*>(smem_f4);
  const int nthr = kD16 ? 64 : blockDim.x;
  const int tid = threadIdx.x;
  const int l = tid & 3;
  const int c = tid >> 2;
  const int cpb = kD16 ? 16 : p.cpb;
  const int b = blockIdx.y;
  const int d = blockIdx.x * cpb + c;
  const int zg = blockIdx.z;
  const int L = p.seqlen, N = kD16 ? 16 : p.dstate, spl = kD16 ? 1 : p.spl;
  const int N16 = spl * 16, BW = N16 + 4;
  const int g = d / (p.dim / p.groups);
  const unsigned mask = nthr >= 32 ? 0xffffffffu : ((1u << nthr) - 1u);

  float* sB = sm;                                             // [16][BW]
  float* sDT = sB + 16 * BW;                                  // [cpb][2 dt/dtu][20]
  float4* sW = reinterpret_cast<float4*>(sDT + cpb * 2 * 20);  // [spl][nthr]

  const T* up = static_cast<const T*>(p.u) + b * p.u_b + d * p.u_d;
  const T* dp = static_cast<const T*>(p.delta) + b * p.dl_b + d * p.dl_d;
  const TW* Bb = static_cast<const TW*>(p.B) + b * p.B_b + g * p.B_g;
  const int64_t row = (int64_t)b * p.dim + d;
  const float* Ap = p.A + (int64_t)d * N;
  const float bias = p.bias ? p.bias[d] : 0.f;
  const int* sip = kPacked ? p.seq_idx + b * p.si_b : nullptr;

  for (int k = 0; k < spl; ++k) sW[k * nthr + tid] = make_float4(0.f, 0.f, 0.f, 0.f);
  float4 w_d16 = make_float4(0.f, 0.f, 0.f, 0.f);  // kD16: the state, instead of sW
  float4 A2_d16 = make_float4(0.f, 0.f, 0.f, 0.f);
  if (kD16) {
    A2_d16 = load4f_(Ap, 4 * l, N);
    A2_d16.x *= kLog2e; A2_d16.y *= kLog2e; A2_d16.z *= kLog2e; A2_d16.w *= kLog2e;
  }
  float sdt = 0.f;
  const int nch = (L + 15) >> 4;
  const int ch_lo = zg * p.gseg * p.R;
  const int ch_end = min(nch, ch_lo + p.gseg * p.R);
  float* dtrow = sDT + (c * 2) * 20;
  for (int ch = ch_lo; ch < ch_end; ++ch) {
    const int t0 = ch << 4;
    const int t = t0 + 4 * l;
    unsigned bnd = 0;  // kPacked: the sub-chunk's sequence starts
    if constexpr (kPacked) {
      SeqRun<4> sq;
      load_seq(sq, sip, t, L);
      bnd = seq_starts16(seq_starts(sq, t, L), l, mask);
    }
    __syncthreads();
    for (int e = tid; e < 2 * N16; e += nthr) {
      const int n = e >> 1, half = e & 1;
      RawN<TW, 8> tmp;
      load_n<kD16>(tmp, Bb + (int64_t)n * p.B_s, t0 + 8 * half, L, n < N, p.vec_B);
      float* dst = sB + (8 * half) * BW + n;
#pragma unroll
      for (int i = 0; i < 8; ++i) dst[i * BW] = tmp[i];
    }
    {
      RawN<T, 4> u4, d4;
      load_n<kD16>(u4, up, t, L, true, p.vec_x);
      load_n<kD16>(d4, dp, t, L, true, p.vec_x);
      float dtv[4], duv[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const float x = d4[q] + bias;
        dtv[q] = (kD16 || t + q < L) ? ((kD16 || p.softplus) ? softplusf_(x, !kD16 && p.exact_softplus) : x) : 0.f;
        duv[q] = dtv[q] * u4[q];
        sdt += dtv[q];
      }
      reinterpret_cast<float4*>(dtrow)[l] = make_float4(dtv[0], dtv[1], dtv[2], dtv[3]);
      reinterpret_cast<float4*>(dtrow + 20)[l] = make_float4(duv[0], duv[1], duv[2], duv[3]);
    }
    __syncthreads();
    const float* dts = dtrow;
    const float* dus = dtrow + 20;
#pragma unroll 1
    for (int k = 0; k < spl; ++k) {
      const int s0 = 16 * k + 4 * l;
      float4 A2 = A2_d16;
      if (!kD16) {
        A2 = load4f_(Ap, s0, N);
        A2.x *= kLog2e; A2.y *= kLog2e; A2.z *= kLog2e; A2.w *= kLog2e;
      }
      float4 h = kD16 ? w_d16 : sW[k * nthr + tid];
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        const float4 Bv = *reinterpret_cast<const float4*>(sB + i * BW + s0);
        const float dtv = dts[i], duv = dus[i];
        const bool rs = kPacked && ((bnd >> i) & 1u);
        h.x = fmaf(rs ? 0.f : fast_exp2(dtv * A2.x), h.x, duv * Bv.x);
        h.y = fmaf(rs ? 0.f : fast_exp2(dtv * A2.y), h.y, duv * Bv.y);
        h.z = fmaf(rs ? 0.f : fast_exp2(dtv * A2.z), h.z, duv * Bv.z);
        h.w = fmaf(rs ? 0.f : fast_exp2(dtv * A2.w), h.w, duv * Bv.w);
      }
      if (kD16) w_d16 = h;
      else sW[k * nthr + tid] = h;
    }
  }
  if (kD16) sW[tid] = w_d16;
  write_carry(p, zg, row, sW, spl, N, nthr, tid, l, sdt, mask);
}

// The carry pass of a sequence split (p.nsplit > 1), in fwd2's layout (p.cpb channels per block);
// also fwd_tp's.
template <typename T, typename TW, bool kPacked>
void launch_scan_fwd2_carry_as(ScanParams& p, cudaStream_t stream) {
  const int smem = scan2_carry_smem_floats(p) * (int)sizeof(float);
  auto carry = fwd2_d16(p) ? scan_fwd2_carry_kernel<T, TW, true, kPacked> : scan_fwd2_carry_kernel<T, TW, false, kPacked>;
  if (smem > 48 * 1024) cudaFuncSetAttribute(carry, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  carry<<<dim3(p.dim / p.cpb, p.batch, p.nsplit - 1), scan_threads(p), smem, stream>>>(p);
}

template <typename T, typename TW, int kSeq>
void launch_scan_fwd2_as(ScanParams& p, cudaStream_t stream) {
  const int nthr = scan_threads(p);
  if (p.nsplit > 1) launch_scan_fwd2_carry_as<T, TW, kSeq != kSeqOff>(p, stream);
  const int smem = scan_fwd2_smem_floats(p) * (int)sizeof(float);
  auto kern = fwd2_d16(p) ? scan_fwd2_kernel<T, TW, true, true, kSeq>
              : fwd2_full(p) ? scan_fwd2_kernel<T, TW, true, false, kSeq>
                             : scan_fwd2_kernel<T, TW, false, false, kSeq>;
  if (smem > 48 * 1024) cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  dim3 grid(p.dim / p.cpb, p.batch, p.nsplit);
  kern<<<grid, nthr, smem, stream>>>(p);
}

template <typename T, typename TW>
void launch_scan_fwd2(ScanParams& p, cudaStream_t stream) {
  with_seq_mode(p, [&](auto seq) { launch_scan_fwd2_as<T, TW, decltype(seq)::value>(p, stream); });
}

}  // namespace ssm
