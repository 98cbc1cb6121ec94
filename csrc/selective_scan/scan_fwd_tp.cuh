// Selective scan forward, time-parallel layout, for dstate <= 16 on grids of few channels
// (batch 1: prefill, long sequences).
//
// fwd2 gives a channel 4 lanes and walks its time serially, so batch 1 x 4096 channels fills
// a quarter of an H200's warp slots; splitting the sequence there costs a second pass of
// exponentials (docs/selective_scan.md). Here a channel gets 16 lanes of a warp that holds two,
// lane = 8k + 2l + c':
//   c' (0, 1): the channel 2w + c' of warp w;
//   l (0..3): the states 4l..4l+3;
//   k (0..3): the slice of steps 8k..8k+7 of each 32-step sub-chunk.
// (Shared memory returns one 32-bit register of the warp per wavefront, so a 128-bit load takes
// 4, or 2 where lanes n and n ^ 1 (or n ^ 2) read the same address: the two channels' lanes of a
// slice and states sit at n, n ^ 1 and read the same B and C. With lane = 16c + 4k + l every B/C
// read took 4 wavefronts, half of all the kernel's L1 traffic.)
// Slice 0 starts from the true state, slices 1-3 from zero. Each slice keeps, per step e, the
// decay product P_e = prod_{e' <= e} exp(dt A) (one multiply per state and step: the
// exponentials are those of its own scan) and q_e = C_e P_e. An exclusive scan over the slices'
// (P, h) ends (2 shuffle rounds) gives every slice its true start state h_in, and its outputs
// are corrected by q_e . h_in, which is C_e . (h_e - h_e^zero-start). No exponential is
// computed twice. The true end of slice 3 is the next sub-chunk's start state of slice 0,
// handed over in shared memory.
// Each lane stages dt, dt*u (tp_dt) and later writes the outputs of steps 2m, 2m+1 (m = 4k + l)
// of its channel; B and C are staged as fp32 [step in slice][slice][state] (tp_at) for the block's
// kCpb channels, double buffered as in fwd2. Blocks of 16 kCpb threads, 32 / kCpb per SM (16 warps, 128 registers).
// kFull: as fwd2_full, plus dstate == 16, whole 32-step sub-chunks and a checkpoint at every
// 16-step chunk (R == 1, the default).
// kSeq (scan_common.cuh), packed sequences: where a sequence starts, a slice's decay (so its P) and
// state are zeroed; the slice scan then carries nothing across. The 32 steps' starts are one mask
// per block (one batch row), gathered by two ballots over the lanes' steps 2m, 2m + 1.
#pragma once

#include <type_traits>

#include "scan_common.cuh"

namespace ssm {

constexpr int kTpSteps = 32;  // steps per sub-chunk
// Staged B (or C) of one sub-chunk: step 8k + e (slice k, its step e) at kTpRow e + tp_slice(k),
// 16 states. A lane (slice k, states 4l..4l+3) reads float4s at kTpRow e + tp_slice(k) + 4l: every
// read of a sub-chunk is the lane's one base plus a constant. Slices 0, 1 sit at banks 0-15,
// 16-31 and slices 2, 3 at 8-23, 24-7 (a padded row of 72 floats): a half-warp (two slices, both
// channels) reads 32 distinct banks, and a staging store of one step over 4 slices x 8 states
// (row-complete global loads, below) hits 32 distinct banks too.
constexpr int kTpRow = 72;
constexpr int kTpBuf = 8 * kTpRow;
__host__ __device__ constexpr int tp_slice(int k) { return 16 * (k & 1) + 40 * (k >> 1); }
__host__ __device__ constexpr int tp_at(int step) { return kTpRow * (step & 7) + tp_slice(step >> 3); }

// B/C staging (2 x 16 states x 32 steps) is shared by the block's kCpb channels: a thread stages
// 16 values per sub-chunk in blocks of 4 channels (2 units of 8 steps), 8 in blocks of 8 (1 unit
// of 8), 4 in blocks of 16 (1 unit of 4).
template <int kCpb> struct TpLayout {
  static constexpr int kThreads = 16 * kCpb;
  static constexpr int kPerThread = 2 * 16 * kTpSteps / kThreads;
  static constexpr int kUnit = kPerThread < 8 ? kPerThread : 8;  // steps per unit
  static constexpr int kUnits = kPerThread / kUnit;              // units per thread
  static_assert(kCpb == 4 || kCpb == 8 || kCpb == 16, "4, 8 or 16 channels per block");
};

template <typename T, typename TW, int kUnit, int kUnits>
struct TpStage {
  RawN<TW, kUnit> bc[kUnits];  // staging unit tid + r nthreads (see the kernel): kUnit steps of a B or C row
  RawN<T, 2> u2, d2, z2;
  SeqRun<2> sq;  // (packed sequences only)
};

// x, opaque to the compiler: a value it must keep (in a register) rather than recompute. The
// staging offsets below are cheap functions of the thread index, and the compiler recomputed
// them (2-6 instructions each) in every sub-chunk.
__device__ __forceinline__ int opaque(int x) {
  asm volatile("" : "+r"(x));
  return x;
}

__device__ __forceinline__ float4 shfl_up4(float4 v, int delta, unsigned mask) {
  v.x = __shfl_up_sync(mask, v.x, delta);
  v.y = __shfl_up_sync(mask, v.y, delta);
  v.z = __shfl_up_sync(mask, v.z, delta);
  v.w = __shfl_up_sync(mask, v.w, delta);
  return v;
}

// Staged dt (and dt*u, 32 floats further) of step t of channel c: a row of 64 floats per channel,
// the odd channel's steps permuted by t ^ 20 (4-step groups g -> g ^ 5). Then a slice's 4-step
// reads (steps 8k..8k+3 or 8k+4..8k+7, both channels of a warp: 8 float4s) hit 32 distinct banks,
// and so do the stores of 16 steps x 2 channels by a half-warp.
constexpr int kDtSwizzle = 20;
__host__ __device__ constexpr int tp_dt(int c, int t) { return 2 * kTpSteps * c + (t ^ (c & 1 ? kDtSwizzle : 0)); }

// Packed sequences: the starts among a sub-chunk's 32 steps (bit s: step s) in every lane, from
// each lane's starts at its steps 2m, 2m + 1 (bits 0, 1); lane 2m + c' (c' = 0, 1: one batch row).
__device__ __forceinline__ unsigned tp_starts32(unsigned bits2) {
  const unsigned even = __ballot_sync(0xffffffffu, bits2 & 1u), odd = __ballot_sync(0xffffffffu, bits2 & 2u);
  return (even & 0x55555555u) | (odd & 0xaaaaaaaau);
}

template <typename T, typename TW, bool kFull, int kCpb, int kSeq>
__global__ void __launch_bounds__(TpLayout<kCpb>::kThreads, 32 / kCpb) scan_fwd_tp_kernel(const ScanParams p) {
  using Lay = TpLayout<kCpb>;
  constexpr bool kPacked = kSeq != kSeqOff, kLast = kSeq == kSeqLast;
  constexpr int kUnit = Lay::kUnit, kUnits = Lay::kUnits;
  using Stage = TpStage<T, TW, kUnit, kUnits>;
  // One double-buffered staging array: per buffer B, C (kTpBuf each, tp_at layout), then
  // [channel][dt / dt*u][step] (tp_dt), then a float4 per thread, the start state of its slice:
  // slice 0's is written by slice 3's lanes (24 threads further on) at the end of the sub-chunk
  // before; the other slices' stay 0. The loop carries the current buffer's offset `bo`.
  constexpr int kDtOff = 2 * kTpBuf;
  constexpr int kCarryOff = kDtOff + kCpb * 2 * kTpSteps;
  constexpr int kStage = kCarryOff + 4 * Lay::kThreads;
  static_assert(kStage % 32 == 0, "both staging buffers must map onto the banks alike");
  __shared__ __align__(16) float sbuf[2 * kStage];
  // kLast: the state and decay product of this thread's slice before its first sequence start
  // (that start's predecessor's final state, which still lacks P h_in; in registers they spilled)
  __shared__ float4 sfirst[kLast ? 2 * Lay::kThreads : 1];
  const unsigned mask = 0xffffffffu;
  const int tid = threadIdx.x;
  const int l = (tid >> 1) & 3;
  const int k = (tid >> 3) & 3;
  const int m = 4 * k + l;
  const int c = 2 * (tid >> 5) + (tid & 1);
  const int b = blockIdx.y;
  const int d = blockIdx.x * kCpb + c;
  const int zg = blockIdx.z;
  const int L = p.seqlen, N = p.dstate;
  const int g = d / (p.dim / p.groups);

  // This block's steps [t_lo, t_hi): sequence group zg (see ScanParams::nsplit).
  const int nch = (L + 15) >> 4;
  const int ch_lo = zg * p.gseg * p.R;
  const int ch_end = min(nch, ch_lo + p.gseg * p.R);
  const int t_lo = ch_lo << 4;
  const int t_hi = min(L, ch_end << 4);

  // Row pointers at this lane's steps (2m) of the group's first sub-chunk: u, delta, z and the
  // outputs; a sub-chunk's are these plus its offset in steps from t_lo. (Running pointers cost
  // two instructions each per sub-chunk, an offset address one.)
  const int m2 = opaque(2 * m);  // (else the loop recomputes the output address from the thread index)
  const int64_t row = (int64_t)b * p.dim + d;
  const T* const up = static_cast<const T*>(p.u) + b * p.u_b + d * p.u_d + t_lo + m2;
  const T* const dp = static_cast<const T*>(p.delta) + b * p.dl_b + d * p.dl_d + t_lo + m2;
  const T* const zp = p.z ? static_cast<const T*>(p.z) + b * p.z_b + d * p.z_d + t_lo + m2 : nullptr;
  T* const outp = static_cast<T*>(p.out) + row * L + t_lo + m2;
  // (y and the checkpoints are optional: held as integers, 0 when absent, so that no null test
  // is repeated per sub-chunk)
  const bool has_y = p.y != nullptr;
  const uintptr_t ya = has_y ? reinterpret_cast<uintptr_t>(static_cast<T*>(p.y) + row * L + t_lo + m2) : 0;
  // Staging unit r of this thread: e = tid + r nthreads -> B or C (e < 16 kTpSteps / kUnit: B),
  // a state sn and kUnit steps from bc_t: its source row (at the group's first sub-chunk), its
  // first step within a sub-chunk and its place in a staging buffer.
  const TW* bc_src[kUnits];
  int bc_t[kUnits], bc_dst[kUnits];
  bool bc_ok[kUnits], bc_vec[kUnits];
#pragma unroll
  for (int r = 0; r < kUnits; ++r) {
    const int e = tid + r * Lay::kThreads;
    const bool isC = e >= 16 * (kTpSteps / kUnit);
    int sn, sj;
    if (kUnit == 8) {
      // 4 consecutive lanes load one state's 32 steps (64 bytes, one line): a warp's load touches
      // 8 lines, not 16 (8 L1 wavefronts fewer per warp and sub-chunk, run 33)
      sj = e & 3;
      sn = (e >> 2) & 15;
    } else {
      // (units of 4 steps, the two halves of slice sj % 4: a warp's stores of a step hit 2
      // slices, 32 banks)
      sn = e & 15;
      sj = (e >> 4) % (kTpSteps / kUnit);
    }
    bc_t[r] = 8 * (sj % 4) + kUnit * (sj / 4);
    bc_ok[r] = sn < N;
    bc_vec[r] = isC ? p.vec_C : p.vec_B;
    bc_src[r] = isC ? static_cast<const TW*>(p.C) + b * p.C_b + g * p.C_g + (int64_t)sn * p.C_s + t_lo + bc_t[r]
                    : static_cast<const TW*>(p.B) + b * p.B_b + g * p.B_g + (int64_t)sn * p.B_s + t_lo + bc_t[r];
    bc_dst[r] = opaque(4 * (isC * kTpBuf + tp_at(bc_t[r]) + sn));  // (bytes) a unit stays within one slice: steps kTpRow apart
  }
  const float bias = p.bias ? p.bias[d] : 0.f;
  const float Dv = p.D ? p.D[d] : 0.f;
  float4 A2 = load4f_(p.A + (int64_t)d * N, 4 * l, N);
  A2.x *= kLog2e; A2.y *= kLog2e; A2.z *= kLog2e; A2.w *= kLog2e;
  const int* sip = kPacked ? p.seq_idx + b * p.si_b : nullptr;
  unsigned bnd = 0;  // kPacked: the sequence starts of the sub-chunk committed last (bit s: step s)

  // Loads the sub-chunk tr steps past t_lo.
  auto prefetch = [&](Stage& st, int tr) {
#pragma unroll
    for (int r = 0; r < kUnits; ++r)
      load_n<kFull>(st.bc[r], bc_src[r], tr, L - t_lo - bc_t[r], bc_ok[r], bc_vec[r]);
    load_n<kFull>(st.u2, up, tr, L - t_lo - m2, true, p.vec_x);
    load_n<kFull>(st.d2, dp, tr, L - t_lo - m2, true, p.vec_x);
    if (kFull || zp) load_n<kFull>(st.z2, zp, tr, L - t_lo - m2, true, p.vec_x);
    // (starts at or past the group's end are not this block's)
    if constexpr (kPacked) load_seq(st.sq, sip, t_lo + tr + m2, t_hi);
  };
  float u_cur[2], z_cur[2];
  // (the thread's dt and dt*u of steps 2m, 2m + 1, bytes)
  const int wr_dt = opaque(4 * (kDtOff + tp_dt(c, 2 * m)));
  auto commit = [&](const Stage& st, int t0, char* buf) {
#pragma unroll
    for (int r = 0; r < kUnits; ++r) {
#pragma unroll
      for (int i = 0; i < kUnit; ++i) *reinterpret_cast<float*>(buf + bc_dst[r] + 4 * kTpRow * i) = st.bc[r][i];
    }
    const int t = t0 + m2;
    float dt[2], du[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      u_cur[j] = st.u2[j];
      z_cur[j] = (kFull || zp) ? st.z2[j] : 0.f;
      const float x = st.d2[j] + bias;
      // past the group's end dt = 0: the state passes unchanged (exp(0) = 1, no input)
      dt[j] = (kFull || t + j < t_hi) ? ((kFull || p.softplus) ? softplusf_(x, !kFull && p.exact_softplus) : x) : 0.f;
      du[j] = dt[j] * u_cur[j];
    }
    *reinterpret_cast<float2*>(buf + wr_dt) = make_float2(dt[0], dt[1]);
    *reinterpret_cast<float2*>(buf + wr_dt + 4 * kTpSteps) = make_float2(du[0], du[1]);
    if constexpr (kPacked) bnd = tp_starts32(seq_starts(st.sq, t, t_hi));
  };

  // Start state of the group (slice 0 only): composed from the zero-start end states of the
  // groups before it, as in fwd2.
  float4 h = make_float4(0.f, 0.f, 0.f, 0.f);
  if (zg > 0 && k == 0) {
    const int64_t bd = (int64_t)p.batch * p.dim;
    for (int zz = 0; zz < zg; ++zz) {
      const float sdt = p.carry_sdt[zz * bd + row];
      const float4 w = load4f_(p.carry_w + (zz * bd + row) * N, 4 * l, N);
      if (kPacked && zz > 0 && seq_start_in_group(p, sip, zz)) h = make_float4(0.f, 0.f, 0.f, 0.f);
      h.x = fmaf(fast_exp2(sdt * A2.x), h.x, w.x);
      h.y = fmaf(fast_exp2(sdt * A2.y), h.y, w.y);
      h.z = fmaf(fast_exp2(sdt * A2.z), h.z, w.z);
      h.w = fmaf(fast_exp2(sdt * A2.w), h.w, w.w);
    }
  }
  const int nw = (t_hi - t_lo + kTpSteps - 1) / kTpSteps;
  {
    Stage st;
    prefetch(st, 0);
    commit(st, t_lo, reinterpret_cast<char*>(sbuf));
  }
  // This thread's reads of a staging buffer, byte offsets: B and C of its slice's steps and
  // states, dt and dt*u of its slice's steps, its slice's start state.
  char* const sb = reinterpret_cast<char*>(sbuf);
  const int rd_bc = opaque(4 * (tp_slice(k) + 4 * l));
  const int rd_dt0 = opaque(4 * (kDtOff + tp_dt(c, 8 * k))), rd_dt1 = opaque(4 * (kDtOff + tp_dt(c, 8 * k + 4)));
  // Slices 1-3 start from 0: their lanes read one zero slot per slice (that of lane 9k of the
  // warp, banks 4k..4k+3: 3 wavefronts for the warp's load, not 4).
  const int own_h = 4 * (kCarryOff + 4 * tid);
  const int rd_h = opaque(k == 0 ? own_h : 4 * (kCarryOff + 4 * ((tid & ~31) + 9 * k)));
  constexpr int kToSlice0 = 4 * 4 * 24;  // bytes from a slice-3 lane's slot back to its slice-0 lane's
  const int wr_h = opaque(own_h - kToSlice0);
  *reinterpret_cast<float4*>(sb + own_h) = h;  // (0 in slices 1-3)
  *reinterpret_cast<float4*>(sb + 4 * kStage + own_h) = make_float4(0.f, 0.f, 0.f, 0.f);
  __syncthreads();

  // Checkpoints: the state at the start of every 16-step chunk ch with ch % R == 0. A sub-chunk
  // holds chunks ch0 (start: slice 0's start state) and ch0 + 1 (start: slice 2's h_in). kFull
  // (R == 1, whole sub-chunks): both are stored, at ckw plus the sub-chunk's offset.
  float* ckp = p.ckpt ? p.ckpt + row * p.nseg * N : nullptr;
  const bool has_ckpt = ckp != nullptr;
  const uintptr_t ckw = has_ckpt ? reinterpret_cast<uintptr_t>(ckp + (int64_t)ch_lo * N + 4 * l) : 0;
  int ch0 = ch_lo, seg0 = ch_lo / p.R, r0 = ch_lo % p.R;
  auto store_ckpt = [&](int seg, float4 v) {
    float* dst = ckp + (int64_t)seg * N + 4 * l;
    if ((N & 3) == 0) {
      if (4 * l < N) *reinterpret_cast<float4*>(dst) = v;
    } else {
      store4f_(ckp + (int64_t)seg * N, 4 * l, N, v);
    }
  };
  // Slices k >= 1 take the previous slice's (P, h) in the slice scan, slices k >= 2 also the end
  // of the one two back; slice 0 keeps its own start state (its h_in is 0). Selects of the
  // operands (0 in place of the neighbour's value), not branches, which the compiler turned into
  // register copies. (A decay product that overflows to inf, possible only for A > 0, turns a
  // state into NaN rather than inf: its outputs are not finite either way.)
  const bool k_ge1 = k >= 1, k_ge2 = k >= 2;
  const int l_keep = opaque(l);  // (else the sum over state lanes recomputes l from the thread index)
  // (bo: the current buffer's offset, bytes)
  for (int w = 0, bo = 0; w < nw; ++w, bo = 4 * kStage - bo) {
    // (opaque: as a multiple of w the offsets would turn back into running pointers)
    const int tr = opaque(w * kTpSteps);
    const int t0 = t_lo + tr;
    h = *reinterpret_cast<const float4*>(sb + bo + rd_h);
    Stage st;
    if (kFull) {
      // unconditional: the last sub-chunk reloads itself, harmlessly (predicated loads cost a
      // register move per address)
      prefetch(st, min(tr + kTpSteps, (nw - 1) * kTpSteps));
    } else if (w + 1 < nw) {
      prefetch(st, tr + kTpSteps);
    }
    // (the checkpoints of a sub-chunk: 2 chunks of 16 states, 32 floats)
    float4* const ck = reinterpret_cast<float4*>(ckw + tr * sizeof(float));
    if (kFull) {
      if (has_ckpt && k == 0) ck[0] = h;
    } else if (ckp && k == 0 && r0 == 0) {
      store_ckpt(seg0, h);
    }

    const float* bB = reinterpret_cast<const float*>(sb + bo + rd_bc);
    const float* bC = bB + kTpBuf;
    const float* dtp[2] = {reinterpret_cast<const float*>(sb + bo + rd_dt0), reinterpret_cast<const float*>(sb + bo + rd_dt1)};
    float4 P = make_float4(1.f, 1.f, 1.f, 1.f);
    float4 q[8];
    float yacc[8];
    const unsigned sst = kPacked ? bnd >> (8 * k) : 0u;  // the starts among this slice's steps: bits 0-7
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const float4 dt4 = *reinterpret_cast<const float4*>(dtp[hh]);
      const float4 du4 = *reinterpret_cast<const float4*>(dtp[hh] + kTpSteps);
      const float dts[4] = {dt4.x, dt4.y, dt4.z, dt4.w};
      const float dus[4] = {du4.x, du4.y, du4.z, du4.w};
#pragma unroll
      for (int e4 = 0; e4 < 4; ++e4) {
        const int e = 4 * hh + e4;
        const float4 Bv = *reinterpret_cast<const float4*>(bB + kTpRow * e);
        const float4 Cv = *reinterpret_cast<const float4*>(bC + kTpRow * e);
        const float dtv = dts[e4], duv = dus[e4];
        float4 a;
        a.x = fast_exp2(dtv * A2.x);
        a.y = fast_exp2(dtv * A2.y);
        a.z = fast_exp2(dtv * A2.z);
        a.w = fast_exp2(dtv * A2.w);
        if (kPacked && ((sst >> e) & 1u)) {
          if (kLast) {
            if ((sst & ((1u << e) - 1u)) == 0u) {
              sfirst[2 * tid] = h;
              sfirst[2 * tid + 1] = P;
            } else {  // (from a start in this slice: exact)
              store_seq_last(p, sip, t0 + 8 * k + e, d, N, 4 * l, h);
            }
          }
          a = make_float4(0.f, 0.f, 0.f, 0.f);
        }
        h.x = fmaf(a.x, h.x, duv * Bv.x);
        h.y = fmaf(a.y, h.y, duv * Bv.y);
        h.z = fmaf(a.z, h.z, duv * Bv.z);
        h.w = fmaf(a.w, h.w, duv * Bv.w);
        P.x *= a.x; P.y *= a.y; P.z *= a.z; P.w *= a.w;
        q[e] = make_float4(Cv.x * P.x, Cv.y * P.y, Cv.z * P.z, Cv.w * P.w);
        yacc[e] = fma4(Cv, h, 0.f);
      }
    }

    float4 hin;
    {
      // Exclusive scan over the 4 slices: hin, the true state at the start of slice k. Round 1
      // gives slice k its predecessor's (P, h) (from zero; slice 0's from its true start), so
      // `pair` is the end of slices k-1..k: the true end of slice k for k <= 1. Round 2 gives
      // slice k >= 2 the true end of slice k-2. (Selecting whole float4s instead of operands made
      // the compiler zero a register and move into it, two instructions a value.)
      const float4 hp = shfl_up4(h, 8, mask), Pp = shfl_up4(P, 8, mask);
      const float4 pair = make_float4(fmaf(P.x, k_ge1 ? hp.x : 0.f, h.x), fmaf(P.y, k_ge1 ? hp.y : 0.f, h.y),
                                      fmaf(P.z, k_ge1 ? hp.z : 0.f, h.z), fmaf(P.w, k_ge1 ? hp.w : 0.f, h.w));
      const float4 e2 = shfl_up4(pair, 16, mask);
      hin = make_float4(fmaf(Pp.x, k_ge2 ? e2.x : 0.f, k_ge1 ? hp.x : 0.f), fmaf(Pp.y, k_ge2 ? e2.y : 0.f, k_ge1 ? hp.y : 0.f),
                        fmaf(Pp.z, k_ge2 ? e2.z : 0.f, k_ge1 ? hp.z : 0.f), fmaf(Pp.w, k_ge2 ? e2.w : 0.f, k_ge1 ? hp.w : 0.f));
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) yacc[e] = fma4(q[e], hin, yacc[e]);
    if (kLast && (sst & 0xffu)) {
      const float4 hf = sfirst[2 * tid], pf = sfirst[2 * tid + 1];
      store_seq_last(p, sip, t0 + 8 * k + __ffs(sst & 0xffu) - 1, d, N, 4 * l,
                     make_float4(fmaf(pf.x, hin.x, hf.x), fmaf(pf.y, hin.y, hf.y), fmaf(pf.z, hin.z, hf.z),
                                 fmaf(pf.w, hin.w, hf.w)));
    }
    if (kFull) {
      if (has_ckpt && k == 2) ck[4] = hin;
    } else {
      const int r1 = r0 + 1 == p.R ? 0 : r0 + 1;
      if (ckp && k == 2 && r1 == 0 && ch0 + 1 < ch_end) store_ckpt(seg0 + (r0 + 1 == p.R), hin);
    }
    // the true end of slice k; slice 3's is the next sub-chunk's start state of slice 0
    h = make_float4(fmaf(P.x, hin.x, h.x), fmaf(P.y, hin.y, h.y), fmaf(P.z, hin.z, h.z), fmaf(P.w, hin.w, h.w));
    if (k == 3) *reinterpret_cast<float4*>(sb + (4 * kStage - bo) + wr_h) = h;

    reduce4_transposing<8, 2, 4>(yacc, l_keep, mask);  // lane l: steps 8k + 2l + {0, 1} = 2m + {0, 1}
    {
      float y[2], o[2];
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        y[j] = fmaf(Dv, u_cur[j], yacc[j]);
        o[j] = (kFull || zp) ? y[j] * z_cur[j] * sigmoidf_(z_cur[j]) : y[j];
      }
      store_n<kFull>(outp, tr, t_hi - t_lo - m2, p.vec_o, o);
      if (has_y) store_n<kFull>(reinterpret_cast<T*>(ya), tr, t_hi - t_lo - m2, p.vec_o, y);
    }
    if (kFull || w + 1 < nw) commit(st, t0 + kTpSteps, sb + (4 * kStage - bo));
    if (!kFull) {
      ch0 += 2;
      r0 += 2;
      while (r0 >= p.R) {
        r0 -= p.R;
        ++seg0;
      }
    }
    __syncthreads();
  }

  // the state at the group's end: slice 3's true end
  if (zg + 1 < p.nsplit || k != 3) return;
  store4f_(p.last + row * N, 4 * l, N, h);
}

template <typename T, typename TW, int kSeq>
void launch_scan_fwd_tp_as(ScanParams& p, cudaStream_t stream) {
  if (p.nsplit > 1) launch_scan_fwd2_carry_as<T, TW, kSeq != kSeqOff>(p, stream);
  const bool full = fwd_tp_full(p);
  auto launch = [&](auto cpb_tag) {
    constexpr int kCpb = decltype(cpb_tag)::value;
    auto kern = full ? scan_fwd_tp_kernel<T, TW, true, kCpb, kSeq> : scan_fwd_tp_kernel<T, TW, false, kCpb, kSeq>;
    kern<<<dim3(p.dim / kCpb, p.batch, p.nsplit), TpLayout<kCpb>::kThreads, 0, stream>>>(p);
  };
  if (p.tp_cpb == 16) launch(std::integral_constant<int, 16>{});
  else if (p.tp_cpb == 8) launch(std::integral_constant<int, 8>{});
  else launch(std::integral_constant<int, 4>{});
}

template <typename T, typename TW>
void launch_scan_fwd_tp(ScanParams& p, cudaStream_t stream) {
  with_seq_mode(p, [&](auto seq) { launch_scan_fwd_tp_as<T, TW, decltype(seq)::value>(p, stream); });
}

}  // namespace ssm
