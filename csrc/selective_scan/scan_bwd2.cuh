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

  // Raw prefetch buffers (input dtypes): B/C [2][N16][16] and u/delta/dout/z [4][cpb][16].
  TW* rawBC = reinterpret_cast<TW*>(sRed + 2 * cpb * 16 * BW);
  T* rawX = reinterpret_cast<T*>(rawBC + 2 * N16 * 16);
  for (int e = tid; e < 2 * N16 * 16; e += nthr) rawBC[e] = TypeOps<TW>::from_f(0.f);  // padded states stay 0
  const T* xbase[4] = {static_cast<const T*>(p.u) + b * p.u_b + d0 * p.u_d,
                       static_cast<const T*>(p.delta) + b * p.dl_b + d0 * p.dl_d,
                       static_cast<const T*>(p.dout) + b * p.do_b + d0 * p.do_d,
                       p.z ? static_cast<const T*>(p.z) + b * p.z_b + d0 * p.z_d : nullptr};
  const int64_t xstride[4] = {p.u_d, p.dl_d, p.do_d, p.z_d};
  const bool can_prefetch = p.prefetch && p.vec_B && p.vec_C && p.vec_x;
  // Issue the copies of sub-chunk ch into the raw buffers; false if it must be loaded directly.
  auto issue_prefetch = [&](int ch) -> bool {
    const int t0 = ch << 4;
    if (!can_prefetch || ch < 0 || t0 + 16 > L) return false;
    constexpr int CPR = (int)sizeof(TW);  // 16-byte pieces per 16-element row
    for (int e = tid; e < 2 * N * CPR; e += nthr) {
      const int which = e / (N * CPR);
      const int rem = e - which * N * CPR;
      const int n = rem / CPR, q = rem - n * CPR;
      const TW* src = (which ? Cb + (int64_t)n * p.C_s : Bb + (int64_t)n * p.B_s) + t0 + q * (16 / CPR);
      cp_async16(rawBC + (which * N16 + n) * 16 + q * (16 / CPR), src);
    }
    constexpr int CPX = (int)sizeof(T);
    const int narr = p.z ? 4 : 3;
    for (int e = tid; e < narr * cpb * CPX; e += nthr) {
      const int arr = e / (cpb * CPX);
      const int rem = e - arr * cpb * CPX;
      const int cc = rem / CPX, q = rem - cc * CPX;
      const T* src = xbase[arr] + cc * xstride[arr] + t0 + q * (16 / CPX);
      cp_async16(rawX + (arr * cpb + cc) * 16 + q * (16 / CPX), src);
    }
    cp_async_commit();
    return true;
  };
  // Stage B (and C when withC) of sub-chunk ch, transposed to [step][state], from the raw
  // buffers (raw) or straight from global memory.
  auto stage_bc = [&](int ch, bool withC, bool raw) {
    if (raw) {
      const int nel = (withC ? 2 : 1) * N16 * 16;
      for (int e = tid; e < nel; e += nthr) {
        const int which = e >= N16 * 16;
        const int rem = e - which * N16 * 16;
        const int n = rem >> 4, i = rem & 15;
        sBC[(which * 16 + i) * BW + n] = TypeOps<TW>::to_f(rawBC[e]);
      }
      return;
    }
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
  // This thread's 4 steps of array arr (0 u, 1 delta, 2 dout, 3 z) of sub-chunk ch.
  auto load_x = [&](float (&v)[4], int arr, int ch, bool raw) {
    const int t = (ch << 4) + 4 * l;
    if (raw) {
      const T* src = rawX + (arr * cpb + c) * 16 + 4 * l;
#pragma unroll
      for (int q = 0; q < 4; ++q) v[q] = TypeOps<T>::to_f(src[q]);
    } else {
      RawN<T, 4> r4;
      load_n(r4, xbase[arr] + c * xstride[arr], t, L, true, p.vec_x);
#pragma unroll
      for (int q = 0; q < 4; ++q) v[q] = r4[q];
    }
  };

  for (int k = 0; k < spl; ++k) {
    sG[k * nthr + tid] = p.dlast ? load4f(p.dlast + row * N, k) : make_float4(0.f, 0.f, 0.f, 0.f);
    sDA[k * nthr + tid] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
  float dD_acc = 0.f, dbias_acc = 0.f;
  const int nch = (L + 15) >> 4;
  float* dtrow = sDT + (c * 3) * 20;
  __syncthreads();  // raw buffers zeroed before any copy lands in them
  bool pref = issue_prefetch((p.nseg - 1) * R);

  for (int j = p.nseg - 1; j >= 0; --j) {
    const int c_first = j * R;
    const int nsub = min(R, nch - c_first);
    for (int k = 0; k < spl; ++k) sHS[k * nthr + tid] = load4f(ckp + (int64_t)j * N, k);

    // Recompute the states at the starts of sub-chunks 1..nsub-1.
#pragma unroll 1
    for (int r = 0; r + 1 < nsub; ++r) {
      const int ch = c_first + r;
      const int t = (ch << 4) + 4 * l;
      if (pref) cp_async_wait_all();
      __syncthreads();
      stage_bc(ch, false, pref);
      {
        float u4[4], d4[4];
        load_x(u4, 0, ch, pref);
        load_x(d4, 1, ch, pref);
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
      pref = issue_prefetch(r + 2 < nsub ? ch + 1 : c_first + nsub - 1);
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
      if (pref) cp_async_wait_all();
      __syncthreads();
      stage_bc(ch, true, pref);
      {
        float uv[4], d4[4], dov[4], zv[4];
        load_x(uv, 0, ch, pref);
        load_x(d4, 1, ch, pref);
        load_x(dov, 2, ch, pref);
        if (zp) load_x(zv, 3, ch, pref);
        float dtv[4], du[4], dyv[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const bool tv = t + q < L;
          const float x = d4[q] + bias;
          dtv[q] = tv ? (p.softplus ? softplusf_(x) : x) : 0.f;
          du[q] = dtv[q] * uv[q];
          dyv[q] = tv ? (zp ? dov[q] * zv[q] * sigmoidf_(zv[q]) : dov[q]) : 0.f;
        }
        reinterpret_cast<float4*>(dtrow)[l] = make_float4(dtv[0], dtv[1], dtv[2], dtv[3]);
        reinterpret_cast<float4*>(dtrow + 20)[l] = make_float4(du[0], du[1], du[2], du[3]);
        reinterpret_cast<float4*>(dtrow + 40)[l] = make_float4(dyv[0], dyv[1], dyv[2], dyv[3]);
      }
      __syncthreads();
      pref = issue_prefetch(r > 0 ? ch - 1 : (j > 0 ? (j - 1) * R : -1));
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

      // Epilogue inputs: this thread's 4 steps again (L2/L1 hits), dt and dy from shared memory.
      float uv[4], d4[4], dov[4], zv[4] = {0.f, 0.f, 0.f, 0.f};
      load_x(uv, 0, ch, false);
      load_x(d4, 1, ch, false);
      load_x(dov, 2, ch, false);
      if (zp) load_x(zv, 3, ch, false);
      reduce4x16(yacc, l, mask);
      reduce4x16(s1, l, mask);
      reduce4x16(s2, l, mask);
      {
        const float4 dt4 = reinterpret_cast<const float4*>(dtrow)[l];
        const float4 dy4 = reinterpret_cast<const float4*>(dtrow + 40)[l];
        const float dtv[4] = {dt4.x, dt4.y, dt4.z, dt4.w};
        const float dyv[4] = {dy4.x, dy4.y, dy4.z, dy4.w};
        float o_du[4], o_dd[4], o_dz[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const bool tv = t + q < L;
          const float y = fmaf(Dv, uv[q], yacc[q]);
          const float sz = zp ? sigmoidf_(zv[q]) : 0.f;
          o_dz[q] = dov[q] * y * sz * (1.f + zv[q] * (1.f - sz));
          o_du[q] = fmaf(dtv[q], s1[q], Dv * dyv[q]);
          float ddt = fmaf(uv[q], s1[q], s2[q]);
          if (p.softplus) ddt *= sigmoidf_(d4[q] + bias);
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
      for (int e0 = tid; e0 < 2 * nel; e0 += 4 * nthr) {
        float sum[4] = {0.f, 0.f, 0.f, 0.f};
        const float* src[4];
        bool ok[4];
#pragma unroll
        for (int m = 0; m < 4; ++m) {
          const int e = e0 + m * nthr;
          const int which = e >= nel;
          const int rem = e - which * nel;
          const int i = rem / N;
          const int n = rem - i * N;
          ok[m] = e < 2 * nel && t0 + i < L;
          src[m] = sRed + ((which * cpb) * 16 + (ok[m] ? i : 0)) * BW + (ok[m] ? n : 0);
        }
        for (int cc = 0; cc < cpb; ++cc) {
#pragma unroll
          for (int m = 0; m < 4; ++m) sum[m] += src[m][cc * 16 * BW];
        }
#pragma unroll
        for (int m = 0; m < 4; ++m) {
          if (ok[m]) {
            const int e = e0 + m * nthr;
            const int which = e >= nel;
            const int rem = e - which * nel;
            (which ? dCp : dBp)[(int64_t)(t0 + (rem / N)) * N + (rem % N)] = sum[m];
          }
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
  const int smem = scan_bwd2_smem_floats(p, (int)sizeof(T), (int)sizeof(TW)) * (int)sizeof(float);
  auto kern = scan_bwd2_kernel<T, TW>;
  if (smem > 48 * 1024) cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  dim3 grid(p.dim / p.cpb, p.batch);
  kern<<<grid, nthr, smem, stream>>>(p);
}

}  // namespace ssm
