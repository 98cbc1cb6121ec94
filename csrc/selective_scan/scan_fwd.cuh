// Selective scan forward kernel.
//
//   h_t = exp(dt_t * A) h_{t-1} + dt_t u_t B_t,   y_t = C_t . h_t + D u_t,   out_t = y_t silu(z_t)
//   dt_t = softplus(delta_t + bias) (or delta_t + bias)
//
// One block: cpb channels x 16 lanes (see scan_common.cuh). States live in shared memory
// between sub-chunks (one float per slot per thread), in a register inside a sub-chunk.
// The B/C rows of the next (sub-chunk, slot) are loaded while the current one is computed.
#pragma once

#include "scan_common.cuh"

namespace ssm {

template <typename T, typename TW>
__global__ void __launch_bounds__(256) scan_fwd_kernel(const ScanParams p) {
  extern __shared__ float smem[];
  const int nthr = blockDim.x;
  const int tid = threadIdx.x;
  const int lane = tid & 15;
  const int cb = tid >> 4;
  const int b = blockIdx.y;
  const int d = blockIdx.x * p.cpb + cb;
  const int L = p.seqlen, N = p.dstate, spl = p.spl;
  const int g = d / (p.dim / p.groups);
  const unsigned mask = nthr >= 32 ? 0xffffffffu : 0x0000ffffu;

  float* s_v = smem + cb * 32;            // dt[16], dt*u[16] of this channel
  float* s_h = smem + p.cpb * 32;         // [spl][nthr] running states

  const T* up = static_cast<const T*>(p.u) + b * p.u_b + d * p.u_d;
  const T* dp = static_cast<const T*>(p.delta) + b * p.dl_b + d * p.dl_d;
  const T* zp = p.z ? static_cast<const T*>(p.z) + b * p.z_b + d * p.z_d : nullptr;
  const TW* Bb = static_cast<const TW*>(p.B) + b * p.B_b + g * p.B_g;
  const TW* Cb = static_cast<const TW*>(p.C) + b * p.C_b + g * p.C_g;
  T* outp = static_cast<T*>(p.out) + ((int64_t)b * p.dim + d) * L;
  const float* Ap = p.A + (int64_t)d * N;
  const float bias = p.bias ? p.bias[d] : 0.f;
  const float Dv = p.D ? p.D[d] : 0.f;
  float* ckp = p.ckpt ? p.ckpt + ((int64_t)b * p.dim + d) * p.nseg * N : nullptr;

  for (int k = 0; k < spl; ++k) s_h[k * nthr + tid] = 0.f;

  const int nchunks = (L + 15) >> 4;

  // Prefetch registers: B/C rows of the next (chunk, slot) item, u/delta of the next chunk.
  Raw16<TW> rb, rc;
  load_row16(rb, Bb + (int64_t)lane * p.B_s, 0, L, lane < N, p.vec_B);
  load_row16(rc, Cb + (int64_t)lane * p.C_s, 0, L, lane < N, p.vec_C);
  float u_nx = 0.f, dl_nx = 0.f;
  if (lane < L) { u_nx = TypeOps<T>::to_f(up[lane]); dl_nx = TypeOps<T>::to_f(dp[lane]); }

  for (int c = 0; c < nchunks; ++c) {
    const int t0 = c << 4;
    const int t = t0 + lane;
    const bool tv = t < L;
    const float uv = u_nx, dlv = dl_nx;
    float zv = 0.f;
    if (zp && tv) zv = TypeOps<T>::to_f(zp[t]);
    if (t + 16 < L) {
      u_nx = TypeOps<T>::to_f(up[t + 16]);
      dl_nx = TypeOps<T>::to_f(dp[t + 16]);
    }
    float dtv = 0.f;
    if (tv) {
      const float x = dlv + bias;
      dtv = p.softplus ? softplusf_(x, p.exact_softplus) : x;
    }
    __syncwarp(mask);
    s_v[lane] = dtv;
    s_v[16 + lane] = dtv * uv;
    __syncwarp(mask);

    float acc[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) acc[i] = 0.f;
    const bool ck = ckp != nullptr && (c % p.R) == 0;

#pragma unroll 1
    for (int k = 0; k < spl; ++k) {
      const int s = lane + 16 * k;
      const bool sv = s < N;
      // prefetch next item
      Raw16<TW> nb, nc;
      {
        int c2 = c, k2 = k + 1;
        if (k2 == spl) { k2 = 0; ++c2; }
        const int s2 = lane + 16 * k2;
        const bool ok = c2 < nchunks && s2 < N;
        load_row16(nb, Bb + (int64_t)s2 * p.B_s, c2 << 4, L, ok, p.vec_B);
        load_row16(nc, Cb + (int64_t)s2 * p.C_s, c2 << 4, L, ok, p.vec_C);
      }
      float h = s_h[k * nthr + tid];
      if (ck && sv) ckp[(int64_t)(c / p.R) * N + s] = h;
      const float A2 = sv ? Ap[s] * kLog2e : 0.f;
      const float4* v4 = reinterpret_cast<const float4*>(s_v);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const float4 dt4 = v4[q];
        const float4 du4 = v4[4 + q];
        const float dts[4] = {dt4.x, dt4.y, dt4.z, dt4.w};
        const float dus[4] = {du4.x, du4.y, du4.z, du4.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = 4 * q + e;
          const float a = fast_exp2(dts[e] * A2);
          h = fmaf(a, h, dus[e] * rb[i]);
          acc[i] = fmaf(rc[i], h, acc[i]);
        }
      }
      s_h[k * nthr + tid] = h;
      rb = nb;
      rc = nc;
    }

    float y = reduce16(acc, lane, mask);
    if (tv) {
      y = fmaf(Dv, uv, y);
      if (zp) y *= zv * sigmoidf_(zv);
      outp[t] = TypeOps<T>::from_f(y);
    }
  }

  float* lastp = p.last + ((int64_t)b * p.dim + d) * N;
  for (int k = 0; k < spl; ++k) {
    const int s = lane + 16 * k;
    if (s < N) lastp[s] = s_h[k * nthr + tid];
  }
}

template <typename T, typename TW>
void launch_scan_fwd(ScanParams& p, cudaStream_t stream) {
  const int nthr = scan_threads(p);
  const int smem = scan_fwd_smem_floats(p) * (int)sizeof(float);
  auto kern = scan_fwd_kernel<T, TW>;
  if (smem > 48 * 1024) cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  dim3 grid(p.dim / p.cpb, p.batch);
  kern<<<grid, nthr, smem, stream>>>(p);
}

}  // namespace ssm
