// Selective scan backward, impl 2 (default). Same layout as scan_fwd2.cuh: 4 lanes per
// channel, 4 states per lane per 16-state slot, 16-step sub-chunks with B, C, dt, dt*u, dy
// staged in shared memory (synchronously here).
//
// With g_t = dL/dh_t and dy_t = dout_t * silu(z_t) (see scan_bwd.cuh for the equations),
// per segment of R sub-chunks (walking backwards): the states at the sub-chunk starts are
// recomputed from the segment's saved start state; then per sub-chunk, in reverse, each
// lane recomputes its 16 states forward (keeping h_{t-1} in registers, and y for dz), then
// runs the reverse recurrence, recomputing exp(dt A). dB/dC are summed over the block's
// channels in shared memory and written as one partial per block, layout
// (P, batch, groups, seqlen, dstate); the binding sums the partials in a fixed order.
#pragma once

#include "scan_common.cuh"

namespace ssm {

template <typename T, typename TW>
__global__ void __launch_bounds__(128) scan_bwd2_kernel(const ScanParams p) {
  extern __shared__ float4 smem_f4[];
  float* sm = reinterpret_cast<float*>(smem_f4);
  const int nthr = blockDim.x;
  const int tid = threadIdx.x;
  const int l = tid & 3;
  const int c = tid >> 2;
  const int cpb = p.cpb;
  const int b = blockIdx.y;
  const int d0 = blockIdx.x * cpb;
  const int d = d0 + c;
  const int L = p.seqlen, N = p.dstate, spl = p.spl, R = p.R;
  const int N16 = spl * 16, BW = N16 + 4;
  const int dpg = p.dim / p.groups;
  const int g = d / dpg;
  const int pidx = (d0 % dpg) / cpb;
  const unsigned mask = nthr >= 32 ? 0xffffffffu : ((1u << nthr) - 1u);

  float* sBC = sm;                                            // [2 B/C][16][BW]
  float* sDT = sBC + 2 * 16 * BW;                             // [cpb][3 dt/dtu/dy][20]
  float4* sHS = reinterpret_cast<float4*>(sDT + cpb * 3 * 20);  // [R][spl][nthr]
  float4* sG = sHS + R * spl * nthr;                          // [spl][nthr]
  float4* sDA = sG + spl * nthr;                              // [spl][nthr]
  float* sRed = reinterpret_cast<float*>(sDA + spl * nthr);   // [2 dB/dC][cpb][16][BW]

  const T* up = static_cast<const T*>(p.u) + b * p.u_b + d * p.u_d;
  const T* dp = static_cast<const T*>(p.delta) + b * p.dl_b + d * p.dl_d;
  const T* zp = p.z ? static_cast<const T*>(p.z) + b * p.z_b + d * p.z_d : nullptr;
  const T* dop = static_cast<const T*>(p.dout) + b * p.do_b + d * p.do_d;
  const TW* Bb = static_cast<const TW*>(p.B) + b * p.B_b + g * p.B_g;
  const TW* Cb = static_cast<const TW*>(p.C) + b * p.C_b + g * p.C_g;
  const int64_t row = (int64_t)b * p.dim + d;
  T* dup = static_cast<T*>(p.du) + row * L;
  T* ddp = static_cast<T*>(p.ddelta) + row * L;
  T* dzp = p.dz ? static_cast<T*>(p.dz) + row * L : nullptr;
  const float* Ap = p.A + (int64_t)d * N;
  const float bias = p.bias ? p.bias[d] : 0.f;
  const float Dv = p.D ? p.D[d] : 0.f;
  const float* ckp = p.ckpt_in + row * p.nseg * N;
  float* dBp = p.dBpart + (((int64_t)pidx * p.batch + b) * p.groups + g) * (int64_t)L * N;
  float* dCp = p.dCpart + (((int64_t)pidx * p.batch + b) * p.groups + g) * (int64_t)L * N;

  auto load4f = [&](const float* src, int k) {  // 4 states of slot k from a (.., N) row, 0 past N
    const int s0 = 16 * k + 4 * l;
    float4 a;
    a.x = s0 + 0 < N ? src[s0 + 0] : 0.f;
    a.y = s0 + 1 < N ? src[s0 + 1] : 0.f;
    a.z = s0 + 2 < N ? src[s0 + 2] : 0.f;
    a.w = s0 + 3 < N ? src[s0 + 3] : 0.f;
    return a;
  };
  // Stage B (and C when withC) of sub-chunk ch, transposed to [step][state].
  auto stage_bc = [&](int ch, bool withC) {
    const int t0 = ch << 4;
    const int nunits = (withC ? 4 : 2) * N16;
    for (int e = tid; e < nunits; e += nthr) {
      const int which = e >= 2 * N16;
      const int rem = e - which * 2 * N16;
      const int n = rem >> 1, half = rem & 1;
      const TW* rowp = which ? Cb + (int64_t)n * p.C_s : Bb + (int64_t)n * p.B_s;
      RawN<TW, 8> tmp;
      load_n(tmp, rowp, t0 + 8 * half, L, n < N, which ? p.vec_C : p.vec_B);
      float* dst = sBC + (which * 16 + 8 * half) * BW + n;
#pragma unroll
      for (int i = 0; i < 8; ++i) dst[i * BW] = tmp[i];
    }
  };

  for (int k = 0; k < spl; ++k) {
    sG[k * nthr + tid] = p.dlast ? load4f(p.dlast + row * N, k) : make_float4(0.f, 0.f, 0.f, 0.f);
    sDA[k * nthr + tid] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
  float dD_acc = 0.f, dbias_acc = 0.f;
  const int nch = (L + 15) >> 4;
  float* dtrow = sDT + (c * 3) * 20;

  for (int j = p.nseg - 1; j >= 0; --j) {
    const int c_first = j * R;
    const int nsub = min(R, nch - c_first);
    for (int k = 0; k < spl; ++k) sHS[k * nthr + tid] = load4f(ckp + (int64_t)j * N, k);

    // Recompute the states at the starts of sub-chunks 1..nsub-1.
#pragma unroll 1
    for (int r = 0; r + 1 < nsub; ++r) {
      const int ch = c_first + r;
      const int t = (ch << 4) + 4 * l;
      __syncthreads();
      stage_bc(ch, false);
      {
        RawN<T, 4> u4, d4;
        load_n(u4, up, t, L, true, p.vec_x);
        load_n(d4, dp, t, L, true, p.vec_x);
        float dt[4], du[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const float x = d4[q] + bias;
          dt[q] = (t + q < L) ? (p.softplus ? softplusf_(x) : x) : 0.f;
          du[q] = dt[q] * u4[q];
        }
        reinterpret_cast<float4*>(dtrow)[l] = make_float4(dt[0], dt[1], dt[2], dt[3]);
        reinterpret_cast<float4*>(dtrow + 20)[l] = make_float4(du[0], du[1], du[2], du[3]);
      }
      __syncthreads();
      const float4* dt4p = reinterpret_cast<const float4*>(dtrow);
      const float4* du4p = reinterpret_cast<const float4*>(dtrow + 20);
#pragma unroll 1
      for (int k = 0; k < spl; ++k) {
        const int s0 = 16 * k + 4 * l;
        float4 A2 = load4f(Ap, k);
        A2.x *= kLog2e; A2.y *= kLog2e; A2.z *= kLog2e; A2.w *= kLog2e;
        float4 h = sHS[(r * spl + k) * nthr + tid];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const float4 dt4 = dt4p[q];
          const float4 du4 = du4p[q];
          const float dts[4] = {dt4.x, dt4.y, dt4.z, dt4.w};
          const float dus[4] = {du4.x, du4.y, du4.z, du4.w};
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int i = 4 * q + e;
            const float4 Bv = *reinterpret_cast<const float4*>(sBC + i * BW + s0);
            h.x = fmaf(fast_exp2(dts[e] * A2.x), h.x, dus[e] * Bv.x);
            h.y = fmaf(fast_exp2(dts[e] * A2.y), h.y, dus[e] * Bv.y);
            h.z = fmaf(fast_exp2(dts[e] * A2.z), h.z, dus[e] * Bv.z);
            h.w = fmaf(fast_exp2(dts[e] * A2.w), h.w, dus[e] * Bv.w);
          }
        }
        sHS[((r + 1) * spl + k) * nthr + tid] = h;
      }
    }

    // Reverse over the sub-chunks of the segment.
#pragma unroll 1
    for (int r = nsub - 1; r >= 0; --r) {
      const int ch = c_first + r;
      const int t0 = ch << 4;
      const int t = t0 + 4 * l;
      float uv[4], xv[4], dtv[4], zv[4], sz[4], dov[4], dyv[4];
      __syncthreads();
      stage_bc(ch, true);
      {
        RawN<T, 4> u4, d4, z4, o4;
        load_n(u4, up, t, L, true, p.vec_x);
        load_n(d4, dp, t, L, true, p.vec_x);
        load_n(o4, dop, t, L, true, p.vec_x);
        if (zp) load_n(z4, zp, t, L, true, p.vec_x);
        float du[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const bool tv = t + q < L;
          uv[q] = u4[q];
          xv[q] = d4[q] + bias;
          dtv[q] = tv ? (p.softplus ? softplusf_(xv[q]) : xv[q]) : 0.f;
          du[q] = dtv[q] * uv[q];
          dov[q] = o4[q];
          if (zp) {
            zv[q] = z4[q];
            sz[q] = sigmoidf_(zv[q]);
            dyv[q] = tv ? dov[q] * zv[q] * sz[q] : 0.f;
          } else {
            zv[q] = 0.f; sz[q] = 0.f;
            dyv[q] = tv ? dov[q] : 0.f;
          }
        }
        reinterpret_cast<float4*>(dtrow)[l] = make_float4(dtv[0], dtv[1], dtv[2], dtv[3]);
        reinterpret_cast<float4*>(dtrow + 20)[l] = make_float4(du[0], du[1], du[2], du[3]);
        reinterpret_cast<float4*>(dtrow + 40)[l] = make_float4(dyv[0], dyv[1], dyv[2], dyv[3]);
      }
      __syncthreads();
      const float4* dt4p = reinterpret_cast<const float4*>(dtrow);
      const float4* du4p = reinterpret_cast<const float4*>(dtrow + 20);
      const float4* dy4p = reinterpret_cast<const float4*>(dtrow + 40);

      float yacc[16], s1[16], s2[16];
#pragma unroll
      for (int i = 0; i < 16; ++i) { yacc[i] = 0.f; s1[i] = 0.f; s2[i] = 0.f; }

#pragma unroll 1
      for (int k = 0; k < spl; ++k) {
        const int s0 = 16 * k + 4 * l;
        const float4 Av = load4f(Ap, k);
        const float4 A2 = make_float4(Av.x * kLog2e, Av.y * kLog2e, Av.z * kLog2e, Av.w * kLog2e);
        float4 hp[16];
        float4 h = sHS[(r * spl + k) * nthr + tid];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const float4 dt4 = dt4p[q];
          const float4 du4 = du4p[q];
          const float dts[4] = {dt4.x, dt4.y, dt4.z, dt4.w};
          const float dus[4] = {du4.x, du4.y, du4.z, du4.w};
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int i = 4 * q + e;
            const float4 Bv = *reinterpret_cast<const float4*>(sBC + i * BW + s0);
            const float4 Cv = *reinterpret_cast<const float4*>(sBC + (16 + i) * BW + s0);
            hp[i] = h;
            h.x = fmaf(fast_exp2(dts[e] * A2.x), h.x, dus[e] * Bv.x);
            h.y = fmaf(fast_exp2(dts[e] * A2.y), h.y, dus[e] * Bv.y);
            h.z = fmaf(fast_exp2(dts[e] * A2.z), h.z, dus[e] * Bv.z);
            h.w = fmaf(fast_exp2(dts[e] * A2.w), h.w, dus[e] * Bv.w);
            float a = yacc[i];
            a = fmaf(Cv.x, h.x, a);
            a = fmaf(Cv.y, h.y, a);
            a = fmaf(Cv.z, h.z, a);
            a = fmaf(Cv.w, h.w, a);
            yacc[i] = a;
          }
        }
        float4 gc = sG[k * nthr + tid];
        float4 dA = make_float4(0.f, 0.f, 0.f, 0.f);
        float4 hn = h;  // h_t of the step being processed
        float* redB = sRed + (c * 16) * BW + s0;
        float* redC = sRed + ((cpb + c) * 16) * BW + s0;
#pragma unroll
        for (int q = 3; q >= 0; --q) {
          const float4 dt4 = dt4p[q];
          const float4 du4 = du4p[q];
          const float4 dy4 = dy4p[q];
          const float dts[4] = {dt4.x, dt4.y, dt4.z, dt4.w};
          const float dus[4] = {du4.x, du4.y, du4.z, du4.w};
          const float dys[4] = {dy4.x, dy4.y, dy4.z, dy4.w};
#pragma unroll
          for (int e = 3; e >= 0; --e) {
            const int i = 4 * q + e;
            const float4 Bv = *reinterpret_cast<const float4*>(sBC + i * BW + s0);
            const float4 Cv = *reinterpret_cast<const float4*>(sBC + (16 + i) * BW + s0);
            const float dtv_ = dts[e], duv = dus[e], dyv_ = dys[e];
            float4 gt;
            gt.x = fmaf(Cv.x, dyv_, gc.x);
            gt.y = fmaf(Cv.y, dyv_, gc.y);
            gt.z = fmaf(Cv.z, dyv_, gc.z);
            gt.w = fmaf(Cv.w, dyv_, gc.w);
            float sv = s1[i];
            sv = fmaf(gt.x, Bv.x, sv);
            sv = fmaf(gt.y, Bv.y, sv);
            sv = fmaf(gt.z, Bv.z, sv);
            sv = fmaf(gt.w, Bv.w, sv);
            s1[i] = sv;
            *reinterpret_cast<float4*>(redB + i * BW) = make_float4(gt.x * duv, gt.y * duv, gt.z * duv, gt.w * duv);
            *reinterpret_cast<float4*>(redC + i * BW) = make_float4(dyv_ * hn.x, dyv_ * hn.y, dyv_ * hn.z, dyv_ * hn.w);
            const float4 hpv = hp[i];
            gc.x = fast_exp2(dtv_ * A2.x) * gt.x;
            gc.y = fast_exp2(dtv_ * A2.y) * gt.y;
            gc.z = fast_exp2(dtv_ * A2.z) * gt.z;
            gc.w = fast_exp2(dtv_ * A2.w) * gt.w;
            const float qx = gc.x * hpv.x, qy = gc.y * hpv.y, qz = gc.z * hpv.z, qw = gc.w * hpv.w;
            float s2v = s2[i];
            s2v = fmaf(qx, Av.x, s2v);
            s2v = fmaf(qy, Av.y, s2v);
            s2v = fmaf(qz, Av.z, s2v);
            s2v = fmaf(qw, Av.w, s2v);
            s2[i] = s2v;
            dA.x = fmaf(qx, dtv_, dA.x);
            dA.y = fmaf(qy, dtv_, dA.y);
            dA.z = fmaf(qz, dtv_, dA.z);
            dA.w = fmaf(qw, dtv_, dA.w);
            hn = hpv;
          }
        }
        sG[k * nthr + tid] = gc;
        float4 acc = sDA[k * nthr + tid];
        acc.x += dA.x; acc.y += dA.y; acc.z += dA.z; acc.w += dA.w;
        sDA[k * nthr + tid] = acc;
      }

      reduce4x16(yacc, l, mask);
      reduce4x16(s1, l, mask);
      reduce4x16(s2, l, mask);
      {
        float o_du[4], o_dd[4], o_dz[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const bool tv = t + q < L;
          const float y = fmaf(Dv, uv[q], yacc[q]);
          o_dz[q] = dov[q] * y * sz[q] * (1.f + zv[q] * (1.f - sz[q]));
          o_du[q] = fmaf(dtv[q], s1[q], Dv * dyv[q]);
          float ddt = fmaf(uv[q], s1[q], s2[q]);
          if (p.softplus) ddt *= sigmoidf_(xv[q]);
          o_dd[q] = ddt;
          if (tv) {
            dD_acc = fmaf(dyv[q], uv[q], dD_acc);
            dbias_acc += ddt;
          }
        }
        store4(dup, t, L, p.vec_o, o_du);
        store4(ddp, t, L, p.vec_o, o_dd);
        if (dzp) store4(dzp, t, L, p.vec_o, o_dz);
      }

      // Sum the channels' dB/dC partials of steps [t0, t0+16) and write this block's partial.
      __syncthreads();
      const int nel = 16 * N;
      for (int e = tid; e < 2 * nel; e += nthr) {
        const int which = e >= nel;
        const int rem = e - which * nel;
        const int i = rem / N;
        const int n = rem - i * N;
        if (t0 + i < L) {
          const float* src = sRed + ((which * cpb) * 16 + i) * BW + n;
          float sum = 0.f;
          for (int cc = 0; cc < cpb; ++cc) sum += src[cc * 16 * BW];
          (which ? dCp : dBp)[(int64_t)(t0 + i) * N + n] = sum;
        }
      }
    }
  }

  float* dAp = p.dApart + row * N;
  for (int k = 0; k < spl; ++k) {
    const int s0 = 16 * k + 4 * l;
    const float4 a = sDA[k * nthr + tid];
    if (s0 + 0 < N) dAp[s0 + 0] = a.x;
    if (s0 + 1 < N) dAp[s0 + 1] = a.y;
    if (s0 + 2 < N) dAp[s0 + 2] = a.z;
    if (s0 + 3 < N) dAp[s0 + 3] = a.w;
  }
  dD_acc += __shfl_xor_sync(mask, dD_acc, 2);
  dbias_acc += __shfl_xor_sync(mask, dbias_acc, 2);
  dD_acc += __shfl_xor_sync(mask, dD_acc, 1);
  dbias_acc += __shfl_xor_sync(mask, dbias_acc, 1);
  if (l == 0) {
    p.dDpart[row] = dD_acc;
    p.dbiaspart[row] = dbias_acc;
  }
}

template <typename T, typename TW>
void launch_scan_bwd2(ScanParams& p, cudaStream_t stream) {
  const int nthr = scan_threads(p);
  const int smem = scan_bwd2_smem_floats(p) * (int)sizeof(float);
  auto kern = scan_bwd2_kernel<T, TW>;
  if (smem > 48 * 1024) cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  dim3 grid(p.dim / p.cpb, p.batch);
  kern<<<grid, nthr, smem, stream>>>(p);
}

}  // namespace ssm
