// Selective scan backward kernel.
//
// With g_t = dL/dh_t (through y and later states), dy_t = dout_t * silu(z_t):
//   g_t   = C_t dy_t + a_{t+1} g_{t+1}              (reverse scan; g_{L-1} also gets dlast)
//   dB_t += g_t dt_t u_t        dC_t += dy_t h_t     (summed over the channels sharing B/C)
//   d(dt_t) = sum_n g_t a_t h_{t-1} A_n + u_t sum_n g_t B_t
//   du_t    = dt_t sum_n g_t B_t + D dy_t
//   dA_n   += sum_t g_t a_t h_{t-1} dt_t
//
// The forward saved the state at the start of every segment of R sub-chunks (16 steps
// each). Per segment, walking backwards: recompute the states at the sub-chunk starts
// (kept in shared memory), then for each sub-chunk in reverse recompute its 16 states in
// registers and run the reverse recurrence over them. dB/dC are summed over the block's
// channels in shared memory and written as per-block partials (summed afterwards, in a
// fixed order, so results are deterministic); dA/dD/dbias are written per batch row.
#pragma once

#include "scan_common.cuh"

namespace ssm {

template <typename T, typename TW>
__global__ void __launch_bounds__(256) scan_bwd_kernel(const ScanParams p) {
  extern __shared__ float smem[];
  const int nthr = blockDim.x;
  const int tid = threadIdx.x;
  const int lane = tid & 15;
  const int cb = tid >> 4;
  const int warp = tid >> 5;
  const int nwarps = (nthr + 31) >> 5;
  const int b = blockIdx.y;
  const int d0 = blockIdx.x * p.cpb;
  const int d = d0 + cb;
  const int L = p.seqlen, N = p.dstate, spl = p.spl, R = p.R;
  const int dpg = p.dim / p.groups;
  const int g = d / dpg;
  const int P = dpg / p.cpb;
  const int pidx = (d0 % dpg) / p.cpb;
  const unsigned mask = nthr >= 32 ? 0xffffffffu : 0x0000ffffu;
  const int N16 = spl * 16;
  constexpr int RR = kBwdRedRow;

  float* s_v = smem + cb * 64;                       // dt[16], dtu[16], dy[16]
  float* s_hs = smem + p.cpb * 64;                   // [R][spl][nthr] sub-chunk start states
  float* s_g = s_hs + R * spl * nthr;                // [spl][nthr] carried a_{t+1} g_{t+1}
  float* s_dA = s_g + spl * nthr;                    // [spl][nthr]
  float* s_red = s_dA + spl * nthr;                  // [nwarps][2][N16][RR]

  const T* up = static_cast<const T*>(p.u) + b * p.u_b + d * p.u_d;
  const T* dp = static_cast<const T*>(p.delta) + b * p.dl_b + d * p.dl_d;
  const T* zp = p.z ? static_cast<const T*>(p.z) + b * p.z_b + d * p.z_d : nullptr;
  const T* dop = static_cast<const T*>(p.dout) + b * p.do_b + d * p.do_d;
  const TW* Bb = static_cast<const TW*>(p.B) + b * p.B_b + g * p.B_g;
  const TW* Cb = static_cast<const TW*>(p.C) + b * p.C_b + g * p.C_g;
  const int64_t row = ((int64_t)b * p.dim + d);
  T* dup = static_cast<T*>(p.du) + row * L;
  T* ddp = static_cast<T*>(p.ddelta) + row * L;
  T* dzp = p.dz ? static_cast<T*>(p.dz) + row * L : nullptr;
  const float* Ap = p.A + (int64_t)d * N;
  const float bias = p.bias ? p.bias[d] : 0.f;
  const float Dv = p.D ? p.D[d] : 0.f;
  const float* ckp = p.ckpt_in + row * p.nseg * N;
  float* dBp = p.dBpart + (((int64_t)pidx * p.batch + b) * p.groups + g) * N * L;
  float* dCp = p.dCpart + (((int64_t)pidx * p.batch + b) * p.groups + g) * N * L;
  (void)P;

  for (int k = 0; k < spl; ++k) {
    const int s = lane + 16 * k;
    s_g[k * nthr + tid] = (p.dlast && s < N) ? p.dlast[row * N + s] : 0.f;
    s_dA[k * nthr + tid] = 0.f;
  }
  float dD_acc = 0.f, dbias_acc = 0.f;
  const int nchunks = (L + 15) >> 4;

  for (int j = p.nseg - 1; j >= 0; --j) {
    const int c_first = j * R;
    const int nsub = min(R, nchunks - c_first);
    for (int k = 0; k < spl; ++k) {
      const int s = lane + 16 * k;
      s_hs[k * nthr + tid] = s < N ? ckp[(int64_t)j * N + s] : 0.f;
    }
    // Recompute the states at the starts of sub-chunks 1..nsub-1 of this segment.
#pragma unroll 1
    for (int r = 0; r + 1 < nsub; ++r) {
      const int t0 = (c_first + r) << 4;
      const int t = t0 + lane;
      float dtv = 0.f, dtu = 0.f;
      if (t < L) {
        const float x = TypeOps<T>::to_f(dp[t]) + bias;
        dtv = p.softplus ? softplusf_(x, p.exact_softplus) : x;
        dtu = dtv * TypeOps<T>::to_f(up[t]);
      }
      __syncwarp(mask);
      s_v[lane] = dtv;
      s_v[16 + lane] = dtu;
      __syncwarp(mask);
#pragma unroll 1
      for (int k = 0; k < spl; ++k) {
        const int s = lane + 16 * k;
        const bool sv = s < N;
        Raw16<TW> rb;
        load_row16(rb, Bb + (int64_t)s * p.B_s, t0, L, sv, p.vec_B);
        const float A2 = sv ? Ap[s] * kLog2e : 0.f;
        float h = s_hs[(r * spl + k) * nthr + tid];
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
            h = fmaf(fast_exp2(dts[e] * A2), h, dus[e] * rb[i]);
          }
        }
        s_hs[((r + 1) * spl + k) * nthr + tid] = h;
      }
    }

    // Reverse over the sub-chunks of the segment.
#pragma unroll 1
    for (int r = nsub - 1; r >= 0; --r) {
      const int t0 = (c_first + r) << 4;
      const int t = t0 + lane;
      const bool tv = t < L;
      float uv = 0.f, xv = 0.f, dtv = 0.f, dtu = 0.f, zv = 0.f, dov = 0.f, dyv = 0.f, sz = 0.f;
      if (tv) {
        uv = TypeOps<T>::to_f(up[t]);
        xv = TypeOps<T>::to_f(dp[t]) + bias;
        dtv = p.softplus ? softplusf_(xv, p.exact_softplus) : xv;
        dtu = dtv * uv;
        dov = TypeOps<T>::to_f(dop[t]);
        if (zp) {
          zv = TypeOps<T>::to_f(zp[t]);
          sz = sigmoidf_(zv);
          dyv = dov * zv * sz;
        } else {
          dyv = dov;
        }
      }
      __syncwarp(mask);
      s_v[lane] = dtv;
      s_v[16 + lane] = dtu;
      s_v[32 + lane] = dyv;
      __syncwarp(mask);

      float yacc[16], s1[16], s2[16];
#pragma unroll
      for (int i = 0; i < 16; ++i) { yacc[i] = 0.f; s1[i] = 0.f; s2[i] = 0.f; }

#pragma unroll 1
      for (int k = 0; k < spl; ++k) {
        const int s = lane + 16 * k;
        const bool sv = s < N;
        Raw16<TW> rb, rc;
        load_row16(rb, Bb + (int64_t)s * p.B_s, t0, L, sv, p.vec_B);
        load_row16(rc, Cb + (int64_t)s * p.C_s, t0, L, sv, p.vec_C);
        const float Av = sv ? Ap[s] : 0.f;
        const float A2 = Av * kLog2e;
        const float hstart = s_hs[(r * spl + k) * nthr + tid];
        const float4* v4 = reinterpret_cast<const float4*>(s_v);
        float a[16], hh[16];
        {
          float h = hstart;
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const float4 dt4 = v4[q];
            const float4 du4 = v4[4 + q];
            const float dts[4] = {dt4.x, dt4.y, dt4.z, dt4.w};
            const float dus[4] = {du4.x, du4.y, du4.z, du4.w};
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int i = 4 * q + e;
              a[i] = fast_exp2(dts[e] * A2);
              h = fmaf(a[i], h, dus[e] * rb[i]);
              hh[i] = h;
              yacc[i] = fmaf(rc[i], h, yacc[i]);
            }
          }
        }
        float gc = s_g[k * nthr + tid];
        float dAk = 0.f;
        float* redB = s_red + ((warp * 2 + 0) * N16 + s) * RR;
        float* redC = s_red + ((warp * 2 + 1) * N16 + s) * RR;
        const bool writer = (tid & 16) == 0;
#pragma unroll
        for (int q = 3; q >= 0; --q) {
          const float4 dt4 = v4[q];
          const float4 du4 = v4[4 + q];
          const float4 dy4 = v4[8 + q];
          const float dts[4] = {dt4.x, dt4.y, dt4.z, dt4.w};
          const float dus[4] = {du4.x, du4.y, du4.z, du4.w};
          const float dys[4] = {dy4.x, dy4.y, dy4.z, dy4.w};
          float pb[4], pc[4];
#pragma unroll
          for (int e = 3; e >= 0; --e) {
            const int i = 4 * q + e;
            const float gt = fmaf(rc[i], dys[e], gc);
            const float hp = i > 0 ? hh[i > 0 ? i - 1 : 0] : hstart;
            gc = a[i] * gt;
            const float qv = gc * hp;
            s2[i] = fmaf(qv, Av, s2[i]);
            dAk = fmaf(qv, dts[e], dAk);
            s1[i] = fmaf(gt, rb[i], s1[i]);
            pb[e] = gt * dus[e];
            pc[e] = dys[e] * hh[i];
          }
          if (nthr >= 32) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              pb[e] += __shfl_xor_sync(mask, pb[e], 16);
              pc[e] += __shfl_xor_sync(mask, pc[e], 16);
            }
          }
          if (writer) {
            reinterpret_cast<float4*>(redB)[q] = make_float4(pb[0], pb[1], pb[2], pb[3]);
            reinterpret_cast<float4*>(redC)[q] = make_float4(pc[0], pc[1], pc[2], pc[3]);
          }
        }
        s_g[k * nthr + tid] = gc;
        s_dA[k * nthr + tid] += dAk;
      }

      const float yv = reduce16(yacc, lane, mask);
      const float S1 = reduce16(s1, lane, mask);
      const float S2 = reduce16(s2, lane, mask);
      if (tv) {
        const float y = fmaf(Dv, uv, yv);
        if (dzp) {
          const float dsilu = sz * (1.f + zv * (1.f - sz));
          dzp[t] = TypeOps<T>::from_f(dov * y * dsilu);
        }
        dup[t] = TypeOps<T>::from_f(fmaf(dtv, S1, Dv * dyv));
        float ddt = fmaf(uv, S1, S2);
        if (p.softplus) ddt *= sigmoidf_(xv);
        ddp[t] = TypeOps<T>::from_f(ddt);
        dD_acc = fmaf(dyv, uv, dD_acc);
        dbias_acc += ddt;
      }

      // Sum the warps' dB/dC partials and write this block's partial for steps [t0, t0+16).
      __syncthreads();
      const int nel = N * 16;
      for (int e = tid; e < 2 * nel; e += nthr) {
        const int which = e >= nel;
        const int rem = e - which * nel;
        const int s = rem >> 4;
        const int i = rem & 15;
        if (t0 + i < L) {
          float sum = 0.f;
          for (int w = 0; w < nwarps; ++w) sum += s_red[((w * 2 + which) * N16 + s) * RR + i];
          (which ? dCp : dBp)[(int64_t)s * L + t0 + i] = sum;
        }
      }
      __syncthreads();
    }
  }

  // Per-batch-row partials of dA, dD, dbias.
  for (int k = 0; k < spl; ++k) {
    const int s = lane + 16 * k;
    if (s < N) p.dApart[row * N + s] = s_dA[k * nthr + tid];
  }
#pragma unroll
  for (int off = 8; off >= 1; off >>= 1) {
    dD_acc += __shfl_xor_sync(mask, dD_acc, off);
    dbias_acc += __shfl_xor_sync(mask, dbias_acc, off);
  }
  if (lane == 0) {
    p.dDpart[row] = dD_acc;
    p.dbiaspart[row] = dbias_acc;
  }
}

template <typename T, typename TW>
void launch_scan_bwd(ScanParams& p, cudaStream_t stream) {
  const int nthr = scan_threads(p);
  const int smem = scan_bwd_smem_floats(p) * (int)sizeof(float);
  auto kern = scan_bwd_kernel<T, TW>;
  if (smem > 48 * 1024) cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  dim3 grid(p.dim / p.cpb, p.batch);
  kern<<<grid, nthr, smem, stream>>>(p);
}

}  // namespace ssm
