// Selective scan backward. Same layout as scan_fwd2.cuh: 4 lanes per channel, 4 states per
// lane per 16-state slot, 16-step sub-chunks with B, C, dt, dt*u, dy staged in shared memory
// (synchronously here).
//
// With g_t = dL/dh_t (through y and later states), dy_t = dout_t * silu(z_t), a_t = exp(dt_t A):
//   g_t   = C_t dy_t + a_{t+1} g_{t+1}              (reverse scan; g_{L-1} also gets dlast)
//   dB_t += g_t dt_t u_t        dC_t += dy_t h_t     (summed over the channels sharing B/C)
//   d(dt_t) = sum_n g_t a_t h_{t-1} A_n + u_t sum_n g_t B_t
//   du_t    = dt_t sum_n g_t B_t + D dy_t
//   dA_n   += sum_t g_t a_t h_{t-1} dt_t
// Per segment of R sub-chunks (walking backwards): the states at the sub-chunk starts are
// recomputed from the segment's saved start state; then per sub-chunk, in reverse, each
// lane recomputes its 16 states forward (keeping h_{t-1} in shared memory, and y for dz), then
// runs the reverse recurrence, recomputing exp(dt A). dB/dC are summed over the block's
// channels in shared memory and written as one partial per block, layout
// (P, batch, groups, seqlen, dstate); the binding sums the partials in a fixed order.
// kRed (scan_bwd2_red_mode) says how the channels' dB/dC terms meet. With kRed 2 the lane of
// channel c holds state s0 + (j ^ (c & 3)) at position j of its float4s (h, g, A, dA...), reads
// B and C from a copy staged in that order, and so sums them over the warp almost select-free
// (reduce8_perm); only the loads from and stores to global memory see the permutation.
// kRecY: y (for dz) is recomputed here, as C h summed over states; otherwise it is read from the
// forward's saved p.y (or not needed: no z).
// kSeq (scan_common.cuh), packed sequences: where a sequence starts (step t), a_t = 0 in the
// recomputed states and in the reverse recurrence, so no gradient reaches h_{t-1} from t (nor
// d(dt_t) from a_t); kSeqLast: g_{t-1} starts from the gradient of the previous sequence's final
// state (dseq_last) instead.
#pragma once

#include "scan_common.cuh"

namespace ssm {

template <typename T, typename TW, int kRed, bool kRecY, int kSeq>
__global__ void __launch_bounds__(128, kBwd2MinBlocks) scan_bwd2_kernel(const ScanParams p) {
  constexpr bool kPacked = kSeq != kSeqOff, kLast = kSeq == kSeqLast;
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
  constexpr bool kWarpRed = kRed != 0;
  constexpr bool kPerm = kRed == 2;
  constexpr int kCopies = kPerm ? 4 : 1;
  const int m = kPerm ? (c & 3) : 0;  // this lane's state order: position j holds s0 + (j ^ m)
  const int CS = 2 * 16 * BW + (kPerm ? kBwd2CopyPad : 0);  // copy -> copy (scan_bwd2_bc_floats)

  float* sBC = sm;                                            // [kCopies][2 B/C][16][BW] (+pad)
  const float* bcm = sBC + m * CS;                            // this lane's copy
  float* sDT = sBC + kCopies * CS;                            // [cpb][3 dt/dtu/dy][20]
  float4* sHS = reinterpret_cast<float4*>(sDT + cpb * 3 * 20);  // [R][spl][nthr]
  float4* sG = sHS + R * spl * nthr;                          // [spl][nthr]
  float4* sDA = sG + spl * nthr;                              // [spl][nthr]
  float4* sHP = sDA + spl * nthr;                             // [16][nthr]
  // [slots][2 dB/dC][16][BW], dC kBwd2RedPad floats past the end of dB (scan_params.h)
  float* sRed = reinterpret_cast<float*>(sHP + 16 * nthr);
  const int RH = 16 * BW + kBwd2RedPad;  // dB -> dC
  const int RS = 2 * RH;             // slot -> slot (see scan_bwd2_smem_floats)
  // dB/dC reduction slot of this thread: its warp (the warp's 8 channels are summed by shuffles)
  // or, for blocks of fewer than 8 channels, its channel.
  const int slot = kWarpRed ? (tid >> 5) : c;
  const int cw = c & 7;
  const int nslots = kWarpRed ? cpb / 8 : cpb;  // scan_bwd2_red_slots

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
  const T* ysp = (!kRecY && zp) ? static_cast<const T*>(p.y) + row * L : nullptr;
  const float* Ap = p.A + (int64_t)d * N;
  const float bias = p.bias ? p.bias[d] : 0.f;
  const float Dv = p.D ? p.D[d] : 0.f;
  const float* ckp = p.ckpt_in + row * p.nseg * N;
  float* dBp = p.dBpart + (((int64_t)pidx * p.batch + b) * p.groups + g) * (int64_t)L * N;
  float* dCp = p.dCpart + (((int64_t)pidx * p.batch + b) * p.groups + g) * (int64_t)L * N;
  const int* sip = kPacked ? p.seq_idx + b * p.si_b : nullptr;
  // kPacked: the sequence starts of the 16-step sub-chunk at t - 4l, in every lane (bit i: step i)
  auto seq_starts_at = [&](int t) {
    SeqRun<4> sq;
    load_seq(sq, sip, t, L);
    return seq_starts16(seq_starts(sq, t, L), l, mask);
  };

  // 4 states of slot k from a (.., N) row in this lane's order, 0 past N
  auto load4f = [&](const float* src, int k) {
    const int s0 = 16 * k + 4 * l;
    float4 a;
    a.x = s0 + (0 ^ m) < N ? src[s0 + (0 ^ m)] : 0.f;
    a.y = s0 + (1 ^ m) < N ? src[s0 + (1 ^ m)] : 0.f;
    a.z = s0 + (2 ^ m) < N ? src[s0 + (2 ^ m)] : 0.f;
    a.w = s0 + (3 ^ m) < N ? src[s0 + (3 ^ m)] : 0.f;
    return a;
  };
  // Stage B (and C when withC) of sub-chunk ch, transposed to [step][state]. A unit is 8 steps
  // of one state row. With 4 copies (spl 1, so 16 states) copy cp holds state n in column n ^ cp;
  // lanes 0-15 of a warp take 16 units (states 0-15 of one B/C half) into copies 0 and 2,
  // lanes 16-31 the same units into copies 1 and 3: each store instruction is conflict-free.
  auto bc_unit = [&](int e, int& which, int& n, int& half, int& cp0) {
    if constexpr (kPerm) {
      const int unit = (e >> 5) * 16 + (e & 15);
      n = unit & 15;
      half = (unit >> 4) & 1;
      which = unit >> 5;
      cp0 = (e >> 4) & 1;
    } else {
      which = e >= 2 * N16;
      const int rem = e - which * 2 * N16;
      n = rem >> 1;
      half = rem & 1;
      cp0 = 0;
    }
  };
  auto stage_bc = [&](int ch, bool withC) {
    const int t0 = ch << 4;
    const int nunits = (withC ? 4 : 2) * N16;
    for (int e = tid; e < nunits * (kPerm ? 2 : 1); e += nthr) {
      int which, n, half, cp0;
      bc_unit(e, which, n, half, cp0);
      const TW* rowp = which ? Cb + (int64_t)n * p.C_s : Bb + (int64_t)n * p.B_s;
      RawN<TW, 8> tmp;
      load_n(tmp, rowp, t0 + 8 * half, L, n < N, which ? p.vec_C : p.vec_B);
#pragma unroll
      for (int cc = 0; cc < (kPerm ? 2 : 1); ++cc) {
        const int cp = cp0 + 2 * cc;
        float* dst = sBC + cp * CS + (which * 16 + 8 * half) * BW + (n ^ cp);
#pragma unroll
        for (int i = 0; i < 8; ++i) dst[i * BW] = tmp[i];
      }
    }
  };

  // Sequence group of this block (p.nsplit > 1: see ScanParams) and its incoming gradient.
  const int zg = blockIdx.z;
  const int64_t bd = (int64_t)p.batch * p.dim;
  for (int k = 0; k < spl; ++k) {
    float4 g = p.dlast ? load4f(p.dlast + row * N, k) : make_float4(0.f, 0.f, 0.f, 0.f);
    if (zg + 1 < p.nsplit) {
      float4 A2 = load4f(Ap, k);
      A2.x *= kLog2e; A2.y *= kLog2e; A2.z *= kLog2e; A2.w *= kLog2e;
      for (int zz = p.nsplit - 1; zz > zg; --zz) {
        const float sdt = p.carry_sdt[zz * bd + row];
        const float4 w = load4f(p.carry_w + (zz * bd + row) * N, k);
        if (kPacked && seq_start_in_group(p, sip, zz)) g = make_float4(0.f, 0.f, 0.f, 0.f);
        g.x = fmaf(fast_exp2(sdt * A2.x), g.x, w.x);
        g.y = fmaf(fast_exp2(sdt * A2.y), g.y, w.y);
        g.z = fmaf(fast_exp2(sdt * A2.z), g.z, w.z);
        g.w = fmaf(fast_exp2(sdt * A2.w), g.w, w.w);
      }
    }
    sG[k * nthr + tid] = g;
    sDA[k * nthr + tid] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
  float dD_acc = 0.f, dbias_acc = 0.f;
  const int nch = (L + 15) >> 4;
  float* dtrow = sDT + (c * 3) * 20;

  const int j_lo = zg * p.gseg;
  for (int j = min(p.nseg, j_lo + p.gseg) - 1; j >= j_lo; --j) {
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
      const unsigned bnd = kPacked ? seq_starts_at(t) : 0u;
      {
        RawN<T, 4> u4, d4;
        load_n(u4, up, t, L, true, p.vec_x);
        load_n(d4, dp, t, L, true, p.vec_x);
        float dt[4], du[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const float x = d4[q] + bias;
          dt[q] = (t + q < L) ? (p.softplus ? softplusf_(x, p.exact_softplus) : x) : 0.f;
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
            const float4 Bv = *reinterpret_cast<const float4*>(bcm + i * BW + s0);
            const bool rs = kPacked && ((bnd >> i) & 1u);
            h.x = fmaf(rs ? 0.f : fast_exp2(dts[e] * A2.x), h.x, dus[e] * Bv.x);
            h.y = fmaf(rs ? 0.f : fast_exp2(dts[e] * A2.y), h.y, dus[e] * Bv.y);
            h.z = fmaf(rs ? 0.f : fast_exp2(dts[e] * A2.z), h.z, dus[e] * Bv.z);
            h.w = fmaf(rs ? 0.f : fast_exp2(dts[e] * A2.w), h.w, dus[e] * Bv.w);
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
      // The raw inputs stay in registers (2 words per 4 elements for 16-bit types) for the
      // epilogue, which recomputes dt, silu(z) etc. from them: fewer live registers in the scan.
      RawN<T, 4> u4, d4, z4, o4, y4;
      __syncthreads();
      stage_bc(ch, true);
      load_n(u4, up, t, L, true, p.vec_x);
      load_n(d4, dp, t, L, true, p.vec_x);
      load_n(o4, dop, t, L, true, p.vec_x);
      if (zp) load_n(z4, zp, t, L, true, p.vec_x);
      if (ysp) load_n(y4, ysp, t, L, true, p.vec_o);
      const unsigned bnd = kPacked ? seq_starts_at(t) : 0u;
      {
        float dtv[4], du[4], dyv[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const bool tv = t + q < L;
          const float x = d4[q] + bias;
          dtv[q] = tv ? (p.softplus ? softplusf_(x, p.exact_softplus) : x) : 0.f;
          du[q] = dtv[q] * u4[q];
          const float zq = zp ? z4[q] : 0.f;
          dyv[q] = tv ? (zp ? o4[q] * zq * sigmoidf_(zq) : o4[q]) : 0.f;
        }
        reinterpret_cast<float4*>(dtrow)[l] = make_float4(dtv[0], dtv[1], dtv[2], dtv[3]);
        reinterpret_cast<float4*>(dtrow + 20)[l] = make_float4(du[0], du[1], du[2], du[3]);
        reinterpret_cast<float4*>(dtrow + 40)[l] = make_float4(dyv[0], dyv[1], dyv[2], dyv[3]);
      }
      __syncthreads();
      // The loads above wait on memory (ncu: a fifth of the stall samples at (8,4096,2048,16)):
      // prefetch the inputs of the sub-chunk processed next, ch - 1, while this one computes.
      if (ch > 0) {
        const int tn = t - 16;
        prefetch_l1(up + tn);
        prefetch_l1(dp + tn);
        prefetch_l1(dop + tn);
        if (zp) prefetch_l1(zp + tn);
        if (ysp) prefetch_l1(ysp + tn);
        for (int e = tid; e < 4 * N16 * (kPerm ? 2 : 1); e += nthr) {
          int which, n, half, cp0;
          bc_unit(e, which, n, half, cp0);
          if (n < N) prefetch_l1((which ? Cb + (int64_t)n * p.C_s : Bb + (int64_t)n * p.B_s) + tn - 4 * l + 8 * half);
        }
        if (r == 0 && j > 0) prefetch_l1(ckp + (int64_t)(j - 1) * N + 4 * l);
      }
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
        // h_{t-1} of the sub-chunk's 16 steps, in shared memory (in registers they cap occupancy)
        float4* hp = sHP + tid;
        const int hps = nthr;
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
            const float4 Bv = *reinterpret_cast<const float4*>(bcm + i * BW + s0);
            hp[i * hps] = h;
            const bool rs = kPacked && ((bnd >> i) & 1u);
            h.x = fmaf(rs ? 0.f : fast_exp2(dts[e] * A2.x), h.x, dus[e] * Bv.x);
            h.y = fmaf(rs ? 0.f : fast_exp2(dts[e] * A2.y), h.y, dus[e] * Bv.y);
            h.z = fmaf(rs ? 0.f : fast_exp2(dts[e] * A2.z), h.z, dus[e] * Bv.z);
            h.w = fmaf(rs ? 0.f : fast_exp2(dts[e] * A2.w), h.w, dus[e] * Bv.w);
            if constexpr (kRecY) {
              const float4 Cv = *reinterpret_cast<const float4*>(bcm + (16 + i) * BW + s0);
              yacc[i] = fma4(Cv, h, yacc[i]);
            }
          }
        }
        float4 gc = sG[k * nthr + tid];
        float4 dA = make_float4(0.f, 0.f, 0.f, 0.f);
        float4 hn = h;  // h_t of the step being processed
        float* redB = sRed + slot * RS + s0;
        float* redC = redB + RH;
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
            const float4 Bv = *reinterpret_cast<const float4*>(bcm + i * BW + s0);
            const float4 Cv = *reinterpret_cast<const float4*>(bcm + (16 + i) * BW + s0);
            const float dtv_ = dts[e], duv = dus[e], dyv_ = dys[e];
            float4 gt;
            gt.x = fmaf(Cv.x, dyv_, gc.x);
            gt.y = fmaf(Cv.y, dyv_, gc.y);
            gt.z = fmaf(Cv.z, dyv_, gc.z);
            gt.w = fmaf(Cv.w, dyv_, gc.w);
            s1[i] = fma4(gt, Bv, s1[i]);
            if constexpr (kPerm) {
              float vb[4] = {gt.x * duv, gt.y * duv, gt.z * duv, gt.w * duv};
              float vc[4] = {dyv_ * hn.x, dyv_ * hn.y, dyv_ * hn.z, dyv_ * hn.w};
              const float vs = reduce8_perm(vb, vc, tid & 31, mask);
              redB[(cw >> 2) * RH + i * BW + (cw & 3)] = vs;
            } else if constexpr (kWarpRed) {
              float v[8] = {gt.x * duv, gt.y * duv, gt.z * duv, gt.w * duv,
                            dyv_ * hn.x, dyv_ * hn.y, dyv_ * hn.z, dyv_ * hn.w};
              // lane 4c+l now holds entry (c & 7) of v summed over the warp's 8 channels:
              // dB (c & 4 == 0) or dC of state s0 + (c & 3), step i.
              const float vs = reduce8_over_channels(v, tid & 31, mask);
              redB[(cw >> 2) * RH + i * BW + (cw & 3)] = vs;
            } else {
              *reinterpret_cast<float4*>(redB + i * BW) = make_float4(gt.x * duv, gt.y * duv, gt.z * duv, gt.w * duv);
              *reinterpret_cast<float4*>(redC + i * BW) = make_float4(dyv_ * hn.x, dyv_ * hn.y, dyv_ * hn.z, dyv_ * hn.w);
            }
            const float4 hpv = hp[i * hps];
            const bool starts = kPacked && ((bnd >> i) & 1u);
            gc.x = (starts ? 0.f : fast_exp2(dtv_ * A2.x)) * gt.x;
            gc.y = (starts ? 0.f : fast_exp2(dtv_ * A2.y)) * gt.y;
            gc.z = (starts ? 0.f : fast_exp2(dtv_ * A2.z)) * gt.z;
            gc.w = (starts ? 0.f : fast_exp2(dtv_ * A2.w)) * gt.w;
            const float4 q = make_float4(gc.x * hpv.x, gc.y * hpv.y, gc.z * hpv.z, gc.w * hpv.w);
            s2[i] = fma4(q, Av, s2[i]);
            dA.x = fmaf(q.x, dtv_, dA.x);
            dA.y = fmaf(q.y, dtv_, dA.y);
            dA.z = fmaf(q.z, dtv_, dA.z);
            dA.w = fmaf(q.w, dtv_, dA.w);
            if (kLast && starts) {  // h_{t-1} is the final state of the sequence before
              const int seq = __ldg(sip + t0 + i - 1);
              if ((unsigned)seq < (unsigned)p.nseq) gc = load4f(p.dseq_last + ((int64_t)seq * p.dim + d) * N, k);
            }
            hn = hpv;
          }
        }
        sG[k * nthr + tid] = gc;
        float4 acc = sDA[k * nthr + tid];
        acc.x += dA.x; acc.y += dA.y; acc.z += dA.z; acc.w += dA.w;
        sDA[k * nthr + tid] = acc;
      }

      if constexpr (kRecY) reduce4_transposing<16>(yacc, l, mask);
      reduce4_transposing<16>(s1, l, mask);
      reduce4_transposing<16>(s2, l, mask);
      {
        float o_du[4], o_dd[4], o_dz[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const bool tv = t + q < L;
          const float uq = u4[q], x = d4[q] + bias, dq = o4[q];
          const float dtq = tv ? (p.softplus ? softplusf_(x, p.exact_softplus) : x) : 0.f;
          const float zq = zp ? z4[q] : 0.f;
          const float szq = zp ? sigmoidf_(zq) : 0.f;
          const float dyq = tv ? (zp ? dq * zq * szq : dq) : 0.f;
          const float y = kRecY ? fmaf(Dv, uq, yacc[q]) : (ysp ? y4[q] : 0.f);
          o_dz[q] = dq * y * szq * (1.f + zq * (1.f - szq));
          o_du[q] = fmaf(dtq, s1[q], Dv * dyq);
          float ddt = fmaf(uq, s1[q], s2[q]);
          if (p.softplus) ddt *= sigmoidf_(x);
          o_dd[q] = ddt;
          if (tv) {
            dD_acc = fmaf(dyq, uq, dD_acc);
            dbias_acc += ddt;
          }
        }
        store_n(dup, t, L, p.vec_o, o_du);
        store_n(ddp, t, L, p.vec_o, o_dd);
        if (dzp) store_n(dzp, t, L, p.vec_o, o_dz);
      }

      // Sum the channels' dB/dC partials of steps [t0, t0+16) and write this block's partial.
      __syncthreads();
      const int nel = 16 * N16;
      for (int e = tid; e < 2 * nel; e += nthr) {
        const int which = e >= nel;
        const int rem = e - which * nel;
        const int i = rem / N16;
        const int n = rem - i * N16;
        if (t0 + i < L && n < N) {
          const float* src = sRed + which * RH + i * BW + n;
          float sum = 0.f;
          for (int sl = 0; sl < nslots; ++sl) sum += src[sl * RS];
          (which ? dCp : dBp)[(int64_t)(t0 + i) * N + n] = sum;
        }
      }
    }
  }

  float* dAp = p.dApart + (zg * bd + row) * N;
  for (int k = 0; k < spl; ++k) store4f_(dAp, 16 * k + 4 * l, N, sDA[k * nthr + tid], m);
  dD_acc += __shfl_xor_sync(mask, dD_acc, 2);
  dbias_acc += __shfl_xor_sync(mask, dbias_acc, 2);
  dD_acc += __shfl_xor_sync(mask, dD_acc, 1);
  dbias_acc += __shfl_xor_sync(mask, dbias_acc, 1);
  if (l == 0) {
    p.dDpart[zg * bd + row] = dD_acc;
    p.dbiaspart[zg * bd + row] = dbias_acc;
  }
}

// First pass of the sequence-split backward: for group z = blockIdx.z + 1, run the reverse
// recurrence g <- exp(dt A) (g + C dy) over the group's steps from g = 0, and sum dt. Same
// thread layout as above; only C, dt and dy are needed.
template <typename T, typename TW, bool kPacked>
__global__ void __launch_bounds__(128) scan_bwd2_carry_kernel(const ScanParams p) {
  extern __shared__ float4 smem_f4[];
  float* sm = reinterpret_cast<float*>(smem_f4);
  const int nthr = blockDim.x;
  const int tid = threadIdx.x;
  const int l = tid & 3;
  const int c = tid >> 2;
  const int b = blockIdx.y;
  const int d = blockIdx.x * p.cpb + c;
  const int zg = blockIdx.z + 1;
  const int L = p.seqlen, N = p.dstate, spl = p.spl;
  const int N16 = spl * 16, BW = N16 + 4;
  const int g = d / (p.dim / p.groups);
  const unsigned mask = nthr >= 32 ? 0xffffffffu : ((1u << nthr) - 1u);

  float* sC = sm;                                               // [16][BW]
  float* sDT = sC + 16 * BW;                                    // [cpb][2 dt/dy][20]
  float4* sW = reinterpret_cast<float4*>(sDT + p.cpb * 2 * 20);  // [spl][nthr]

  const T* dp = static_cast<const T*>(p.delta) + b * p.dl_b + d * p.dl_d;
  const T* zp = p.z ? static_cast<const T*>(p.z) + b * p.z_b + d * p.z_d : nullptr;
  const T* dop = static_cast<const T*>(p.dout) + b * p.do_b + d * p.do_d;
  const TW* Cb = static_cast<const TW*>(p.C) + b * p.C_b + g * p.C_g;
  const int64_t row = (int64_t)b * p.dim + d;
  const float* Ap = p.A + (int64_t)d * N;
  const float bias = p.bias ? p.bias[d] : 0.f;
  const int* sip = kPacked ? p.seq_idx + b * p.si_b : nullptr;

  for (int k = 0; k < spl; ++k) sW[k * nthr + tid] = make_float4(0.f, 0.f, 0.f, 0.f);
  float sdt = 0.f;
  const int nch = (L + 15) >> 4;
  const int ch_lo = zg * p.gseg * p.R;
  const int ch_hi = min(nch, ch_lo + p.gseg * p.R);
  float* dtrow = sDT + (c * 2) * 20;
  for (int ch = ch_hi - 1; ch >= ch_lo; --ch) {
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
      load_n(tmp, Cb + (int64_t)n * p.C_s, t0 + 8 * half, L, n < N, p.vec_C);
      float* dst = sC + (8 * half) * BW + n;
#pragma unroll
      for (int i = 0; i < 8; ++i) dst[i * BW] = tmp[i];
    }
    {
      RawN<T, 4> d4, o4, z4;
      load_n(d4, dp, t, L, true, p.vec_x);
      load_n(o4, dop, t, L, true, p.vec_x);
      if (zp) load_n(z4, zp, t, L, true, p.vec_x);
      float dtv[4], dyv[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const bool tv = t + q < L;
        const float x = d4[q] + bias;
        dtv[q] = tv ? (p.softplus ? softplusf_(x, p.exact_softplus) : x) : 0.f;
        const float zq = zp ? z4[q] : 0.f;
        dyv[q] = tv ? (zp ? o4[q] * zq * sigmoidf_(zq) : o4[q]) : 0.f;
        sdt += dtv[q];
      }
      reinterpret_cast<float4*>(dtrow)[l] = make_float4(dtv[0], dtv[1], dtv[2], dtv[3]);
      reinterpret_cast<float4*>(dtrow + 20)[l] = make_float4(dyv[0], dyv[1], dyv[2], dyv[3]);
    }
    __syncthreads();
    const float* dts = dtrow;
    const float* dys = dtrow + 20;
#pragma unroll 1
    for (int k = 0; k < spl; ++k) {
      const int s0 = 16 * k + 4 * l;
      float4 A2 = load4f_(Ap, s0, N);
      A2.x *= kLog2e; A2.y *= kLog2e; A2.z *= kLog2e; A2.w *= kLog2e;
      float4 gc = sW[k * nthr + tid];
#pragma unroll
      for (int i = 15; i >= 0; --i) {
        const float4 Cv = *reinterpret_cast<const float4*>(sC + i * BW + s0);
        const float dtv = dts[i], dyv = dys[i];
        gc.x = fast_exp2(dtv * A2.x) * fmaf(Cv.x, dyv, gc.x);
        gc.y = fast_exp2(dtv * A2.y) * fmaf(Cv.y, dyv, gc.y);
        gc.z = fast_exp2(dtv * A2.z) * fmaf(Cv.z, dyv, gc.z);
        gc.w = fast_exp2(dtv * A2.w) * fmaf(Cv.w, dyv, gc.w);
        if (kPacked && ((bnd >> i) & 1u)) {  // as in the kernel above
          gc = make_float4(0.f, 0.f, 0.f, 0.f);
          if (p.dseq_last) {
            const int seq = __ldg(sip + t0 + i - 1);
            if ((unsigned)seq < (unsigned)p.nseq) gc = load4f_(p.dseq_last + ((int64_t)seq * p.dim + d) * N, s0, N);
          }
        }
      }
      sW[k * nthr + tid] = gc;
    }
  }
  write_carry(p, zg, row, sW, spl, N, nthr, tid, l, sdt, mask);
}

template <typename T, typename TW, int kSeq>
void launch_scan_bwd2_as(ScanParams& p, cudaStream_t stream) {
  const int nthr = scan_threads(p);
  if (p.nsplit > 1) {
    const int smem = scan2_carry_smem_floats(p) * (int)sizeof(float);
    auto carry = scan_bwd2_carry_kernel<T, TW, kSeq != kSeqOff>;
    if (smem > 48 * 1024) cudaFuncSetAttribute(carry, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    carry<<<dim3(p.dim / p.cpb, p.batch, p.nsplit - 1), nthr, smem, stream>>>(p);
  }
  const int smem = scan_bwd2_smem_floats(p) * (int)sizeof(float);
  const int mode = scan_bwd2_red_mode(p);
  auto kern = scan_bwd2_kernel<T, TW, 0, true, kSeq>;
  if (p.z != nullptr && p.y == nullptr) {  // y recomputed for dz
    if (mode == 2) kern = scan_bwd2_kernel<T, TW, 2, true, kSeq>;
    else if (mode == 1) kern = scan_bwd2_kernel<T, TW, 1, true, kSeq>;
  } else {
    if (mode == 2) kern = scan_bwd2_kernel<T, TW, 2, false, kSeq>;
    else if (mode == 1) kern = scan_bwd2_kernel<T, TW, 1, false, kSeq>;
    else kern = scan_bwd2_kernel<T, TW, 0, false, kSeq>;
  }
  if (smem > 48 * 1024) cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  dim3 grid(p.dim / p.cpb, p.batch, p.nsplit);
  kern<<<grid, nthr, smem, stream>>>(p);
}

template <typename T, typename TW>
void launch_scan_bwd2(ScanParams& p, cudaStream_t stream) {
  with_seq_mode(p, [&](auto seq) { launch_scan_bwd2_as<T, TW, decltype(seq)::value>(p, stream); });
}

}  // namespace ssm
