// Selective scan (Mamba S6) kernels: shared definitions (fast math, element types, row loads and
// stores, the lane butterflies of fwd2 / bwd2 / fwd_tp). Design: docs/selective_scan.md.
#pragma once

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

#include "scan_params.h"

namespace ssm {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float fast_lg2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// acc + a.x b.x + a.y b.y + a.z b.z + a.w b.w, as a chain of fmas in that order.
__device__ __forceinline__ float fma4(float4 a, float4 b, float acc) {
  acc = fmaf(a.x, b.x, acc);
  acc = fmaf(a.y, b.y, acc);
  acc = fmaf(a.z, b.z, acc);
  return fmaf(a.w, b.w, acc);
}

// Ask for the cache line holding p to be brought into L1 (and L2); no register waits on it.
__device__ __forceinline__ void prefetch_l1(const void* p) { asm volatile("prefetch.global.L1 [%0];" ::"l"(p)); }

__device__ __forceinline__ float sigmoidf_(float x) { return 1.f / (1.f + __expf(-x)); }

// softplus(x) = log(1 + e^x), relative error under ~3e-6: e^x and log2 on the special-function
// units, and a series where 1 + e^x would lose e^x's digits (log1pf took ~37 instructions a call,
// ~13% of the forward's instructions per sub-chunk by SASS count). exact: log1pf (MAMBA_SSM_SCAN_EXACT_SOFTPLUS=1).
static __device__ __noinline__ float softplus_exact(float x) { return x > 20.f ? x : log1pf(__expf(x)); }

__device__ __forceinline__ float softplusf_(float x, bool exact) {
  if (exact) return softplus_exact(x);  // out of line: inlined, its registers crowd the hot loops
  const float e = fast_exp2(x * kLog2e);
  // log1p(e) = e - e^2/2 + e^3/3 - e^4/4 + e^5/5 - ..., truncated: relative error < e^5/6 < 2e-7
  const float series = e * fmaf(e, fmaf(e, fmaf(e, fmaf(e, 0.2f, -0.25f), 1.f / 3.f), -0.5f), 1.f);
  const float via_log = fast_lg2(1.f + e) * kLn2;
  return x > 20.f ? x : (e < 0.0625f ? series : via_log);
}

// ---------------------------------------------------------------------------------------
// Element types: conversions to and from fp32, and element i of a row held as 32-bit words.
template <typename T> struct TypeOps;

template <> struct TypeOps<float> {
  __device__ __forceinline__ static float to_f(float v) { return v; }
  __device__ __forceinline__ static float from_f(float v) { return v; }
  __device__ __forceinline__ static uint32_t bits(float v) { return __float_as_uint(v); }
  __device__ __forceinline__ static float word_elem(const uint32_t* w, int i) { return __uint_as_float(w[i]); }
};

template <> struct TypeOps<__nv_bfloat16> {
  __device__ __forceinline__ static float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ __forceinline__ static __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
  __device__ __forceinline__ static uint32_t bits(__nv_bfloat16 v) { return (uint32_t)__bfloat16_as_ushort(v); }
  __device__ __forceinline__ static float word_elem(const uint32_t* w, int i) {
    return (i & 1) ? __uint_as_float(w[i >> 1] & 0xffff0000u) : __uint_as_float(w[i >> 1] << 16);
  }
};

template <> struct TypeOps<__half> {
  __device__ __forceinline__ static float to_f(__half v) { return __half2float(v); }
  __device__ __forceinline__ static __half from_f(float v) { return __float2half_rn(v); }
  __device__ __forceinline__ static uint32_t bits(__half v) { return (uint32_t)__half_as_ushort(v); }
  __device__ __forceinline__ static float word_elem(const uint32_t* w, int i) {
    return __half2float(__ushort_as_half((unsigned short)((i & 1) ? (w[i >> 1] >> 16) : (w[i >> 1] & 0xffffu))));
  }
};

// ---------------------------------------------------------------------------------------
// NE consecutive elements of a row held as 32-bit words.
template <typename T, int NE> struct RawN {
  static constexpr int kW = NE * (int)sizeof(T) / 4;
  uint32_t w[kW];
  __device__ __forceinline__ float operator[](int i) const { return TypeOps<T>::word_elem(w, i); }
};

// Elements [t, t+NE) of a row; past L or for an invalid row they read as 0. `vec`: the row
// start is 16-byte aligned (t is a multiple of NE). kFull: the caller guarantees valid, vec and
// t + NE <= L, so only the vector load is compiled.
template <bool kFull = false, typename T, int NE>
__device__ __forceinline__ void load_n(RawN<T, NE>& r, const T* row, int t, int L, bool valid, bool vec) {
  constexpr int W = RawN<T, NE>::kW;
  if (kFull || (valid && vec && t + NE <= L)) {
    if constexpr (W == 1) {
      r.w[0] = __ldg(reinterpret_cast<const uint32_t*>(row + t));
    } else if constexpr (W == 2) {
      const uint2 x = __ldg(reinterpret_cast<const uint2*>(row + t));
      r.w[0] = x.x; r.w[1] = x.y;
    } else {
#pragma unroll
      for (int q = 0; q < W / 4; ++q) {
        const uint4 x = __ldg(reinterpret_cast<const uint4*>(row + t) + q);
        r.w[4 * q + 0] = x.x; r.w[4 * q + 1] = x.y; r.w[4 * q + 2] = x.z; r.w[4 * q + 3] = x.w;
      }
    }
  } else {
#pragma unroll
    for (int q = 0; q < W; ++q) r.w[q] = 0u;
    if (valid) {
#pragma unroll
      for (int i = 0; i < NE; ++i) {
        if (t + i < L) {
          if constexpr (sizeof(T) == 4) r.w[i] = TypeOps<T>::bits(row[t + i]);
          else r.w[i >> 1] |= TypeOps<T>::bits(row[t + i]) << ((i & 1) * 16);
        }
      }
    }
  }
}

// Store NE (2 or 4) consecutive values at [t, t+NE) of a contiguous row, dropping those at or
// past L. kFull: the caller guarantees vec and t + NE <= L (t a multiple of NE).
template <bool kFull = false, typename T, int NE>
__device__ __forceinline__ void store_n(T* row, int t, int L, bool vec, const float (&v)[NE]) {
  static_assert(NE == 2 || NE == 4, "2 or 4 values");
  if (kFull || (vec && t + NE <= L)) {
    if constexpr (sizeof(T) == 4 && NE == 4) {
      *reinterpret_cast<float4*>(row + t) = make_float4(v[0], v[1], v[2], v[3]);
    } else if constexpr (sizeof(T) == 4) {
      *reinterpret_cast<float2*>(row + t) = make_float2(v[0], v[1]);
    } else {
      // 16-bit values, two to a word
      const uint32_t lo = TypeOps<T>::bits(TypeOps<T>::from_f(v[0])) | (TypeOps<T>::bits(TypeOps<T>::from_f(v[1])) << 16);
      if constexpr (NE == 4) {
        const uint32_t hi = TypeOps<T>::bits(TypeOps<T>::from_f(v[2])) | (TypeOps<T>::bits(TypeOps<T>::from_f(v[3])) << 16);
        *reinterpret_cast<uint2*>(row + t) = make_uint2(lo, hi);
      } else {
        *reinterpret_cast<uint32_t*>(row + t) = lo;
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < NE; ++j)
      if (t + j < L) row[t + j] = TypeOps<T>::from_f(v[j]);
  }
}

// States s0..s0+3 of a (.., N) fp32 row, 0 at or past N.
__device__ __forceinline__ float4 load4f_(const float* src, int s0, int N) {
  float4 a;
  a.x = s0 + 0 < N ? src[s0 + 0] : 0.f;
  a.y = s0 + 1 < N ? src[s0 + 1] : 0.f;
  a.z = s0 + 2 < N ? src[s0 + 2] : 0.f;
  a.w = s0 + 3 < N ? src[s0 + 3] : 0.f;
  return a;
}

// Store v as the states s0..s0+3 of a (.., N) fp32 row, dropping those at or past N; with a lane
// order m (scan_bwd2.cuh), position j of v is state s0 + (j ^ m).
__device__ __forceinline__ void store4f_(float* dst, int s0, int N, float4 v, int m = 0) {
  if (s0 + (0 ^ m) < N) dst[s0 + (0 ^ m)] = v.x;
  if (s0 + (1 ^ m) < N) dst[s0 + (1 ^ m)] = v.y;
  if (s0 + (2 ^ m) < N) dst[s0 + (2 ^ m)] = v.z;
  if (s0 + (3 ^ m) < N) dst[s0 + (3 ^ m)] = v.w;
}

// End of a carry kernel (the first pass of a sequence split): group zg's zero-start end state,
// held by the block in sW [spl][nthr], and its sum of dt over the channel's 4 lanes.
__device__ __forceinline__ void write_carry(const ScanParams& p, int zg, int64_t row, const float4* sW, int spl,
                                            int N, int nthr, int tid, int l, float sdt, unsigned mask) {
  const int64_t bd = (int64_t)p.batch * p.dim;
  float* wp = p.carry_w + (zg * bd + row) * N;
  for (int k = 0; k < spl; ++k) store4f_(wp, 16 * k + 4 * l, N, sW[k * nthr + tid]);
  sdt += __shfl_xor_sync(mask, sdt, 2);
  sdt += __shfl_xor_sync(mask, sdt, 1);
  if (l == 0) p.carry_sdt[zg * bd + row] = sdt;
}

// ---------------------------------------------------------------------------------------
// Packed sequences (ScanParams::seq_idx): a sequence starts at step t >= 1 where seq_idx[t] !=
// seq_idx[t - 1]; there the decay of the carried state is 0.
// The kernels' kSeq: kSeqOff (seq_idx null: the unpacked code, unchanged), kSeqIdx, kSeqLast
// (also per-sequence final states: seq_last, dseq_last; a separate instantiation because their
// stores and loads inside the unrolled steps made fwd_tp and bwd2 spill).
constexpr int kSeqOff = 0, kSeqIdx = 1, kSeqLast = 2;

// f(std::integral_constant<int, kSeq>{}) for the launch's kSeq.
template <typename F>
void with_seq_mode(const ScanParams& p, F&& f) {
  if (p.seq_idx == nullptr) f(std::integral_constant<int, kSeqOff>{});
  else if (p.seq_last != nullptr || p.dseq_last != nullptr) f(std::integral_constant<int, kSeqLast>{});
  else f(std::integral_constant<int, kSeqIdx>{});
}

// seq_idx at steps t - 1 .. t + K - 1 of a row, 0 outside [0, lim).
template <int K> struct SeqRun { int v[K + 1]; };

template <int K>
__device__ __forceinline__ void load_seq(SeqRun<K>& s, const int* row, int t, int lim) {
#pragma unroll
  for (int j = 0; j <= K; ++j) s.v[j] = (t - 1 + j >= 0 && t - 1 + j < lim) ? __ldg(row + t - 1 + j) : 0;
}

// Bit j (j < K) set where a sequence starts at step t + j, 1 <= t + j < lim.
template <int K>
__device__ __forceinline__ unsigned seq_starts(const SeqRun<K>& s, int t, int lim) {
  unsigned bits = 0;
#pragma unroll
  for (int j = 0; j < K; ++j)
    if (t + j >= 1 && t + j < lim && s.v[j + 1] != s.v[j]) bits |= 1u << j;
  return bits;
}

// The starts among the 16 steps of a fwd2 / bwd2 sub-chunk (bit i: step t0 + i) in every lane,
// from lane l's 4 (steps t0 + 4l ..): the 4 lanes of a channel (lane bits 0, 1) combine theirs.
__device__ __forceinline__ unsigned seq_starts16(unsigned bits4, int l, unsigned mask) {
  unsigned bits = bits4 << (4 * l);
  bits |= __shfl_xor_sync(mask, bits, 1);
  bits |= __shfl_xor_sync(mask, bits, 2);
  return bits;
}

// Whether a sequence starts among the steps [t_lo, t_hi) of sequence group zz >= 1 of a split
// (ScanParams::nsplit): then nothing carries across the group.
__device__ __forceinline__ bool seq_start_in_group(const ScanParams& p, const int* row, int zz) {
  const int span = p.gseg * p.R * 16;
  const int t_lo = zz * span, t_hi = min(p.seqlen, t_lo + span);
  return __ldg(row + t_hi - 1) != __ldg(row + t_lo - 1);
}

// With per-sequence final states (ScanParams::seq_last): h, the states s0..s0+3 of channel d at
// step t - 1, where a sequence starts at t, is the final state of the one before.
__device__ __forceinline__ void store_seq_last(const ScanParams& p, const int* row, int t, int d, int N, int s0,
                                               float4 h) {
  const int seq = __ldg(row + t - 1);
  if ((unsigned)seq < (unsigned)p.nseq) store4f_(p.seq_last + ((int64_t)seq * p.dim + d) * N, s0, N, h);
}

// Transposing butterfly over the 4 lanes of a channel, l = 0..3 (bit 0 of l is lane bit kXor0,
// bit 1 lane bit kXor1): on exit v[0..M/4) of lane l hold the sums over the 4 lanes of the entry
// values v[l M/4 .. (l+1) M/4).
template <int M, int kXor0 = 1, int kXor1 = 2>
__device__ __forceinline__ void reduce4_transposing(float (&v)[M], int l, unsigned mask) {
  static_assert(M % 4 == 0, "M values per lane, a multiple of 4");
  {
    const bool hi = (l & 2) != 0;
#pragma unroll
    for (int j = 0; j < M / 2; ++j) {
      const float send = hi ? v[j] : v[j + M / 2];
      const float keep = hi ? v[j + M / 2] : v[j];
      v[j] = keep + __shfl_xor_sync(mask, send, kXor1);
    }
  }
  {
    const bool hi = (l & 1) != 0;
#pragma unroll
    for (int j = 0; j < M / 4; ++j) {
      const float send = hi ? v[j] : v[j + M / 4];
      const float keep = hi ? v[j + M / 4] : v[j];
      v[j] = keep + __shfl_xor_sync(mask, send, kXor0);
    }
  }
}

// Sum over the 8 channels of a warp (lane bits 2..4) of 8 values per lane, transposing: on exit
// lane 4c+l returns entry (c & 7) summed over the lanes 4c'+l of its warp. 7 shuffles.
__device__ __forceinline__ float reduce8_over_channels(float (&v)[8], int lane, unsigned mask) {
  {
    const bool hi = (lane & 16) != 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float send = hi ? v[j] : v[j + 4];
      const float keep = hi ? v[j + 4] : v[j];
      v[j] = keep + __shfl_xor_sync(mask, send, 16);
    }
  }
  {
    const bool hi = (lane & 8) != 0;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const float send = hi ? v[j] : v[j + 2];
      const float keep = hi ? v[j + 2] : v[j];
      v[j] = keep + __shfl_xor_sync(mask, send, 8);
    }
  }
  const bool hi = (lane & 4) != 0;
  return (hi ? v[1] : v[0]) + __shfl_xor_sync(mask, hi ? v[0] : v[1], 4);
}

// The same sum when lane 4c+l holds its 4 states in the order j ^ (c & 3) and keeps the dB and
// dC terms apart (b, d): the two lanes of each exchange then hold the states to be added at the
// same positions, so only the last exchange (dB against dC) needs selects. On exit lane 4c+l
// returns, summed over its warp's 8 channels, the term of state s0 + (c & 3): dB when c & 4 is 0,
// else dC. 7 shuffles and 2 selects (reduce8_over_channels: 7 and 14).
__device__ __forceinline__ float reduce8_perm(float (&b)[4], float (&d)[4], int lane, unsigned mask) {
  // lanes c and c ^ 2: positions 0, 1 here are positions 2, 3 there
  b[0] += __shfl_xor_sync(mask, b[2], 8);
  b[1] += __shfl_xor_sync(mask, b[3], 8);
  d[0] += __shfl_xor_sync(mask, d[2], 8);
  d[1] += __shfl_xor_sync(mask, d[3], 8);
  // lanes c and c ^ 1: position 0 here is position 1 there
  b[0] += __shfl_xor_sync(mask, b[1], 4);
  d[0] += __shfl_xor_sync(mask, d[1], 4);
  const bool hi = (lane & 16) != 0;
  return (hi ? d[0] : b[0]) + __shfl_xor_sync(mask, hi ? b[0] : d[0], 16);
}

// Blocks kept resident per SM, which bound the registers: fwd2 8 x 64 threads (128 registers;
// 10 or 12 blocks spilled and lost at every shape), bwd2 3 x 128 threads (168 registers; 13-31%
// faster than 2 blocks at 255 at batch 8).
constexpr int kFwd2MinBlocks = 8;
constexpr int kBwd2MinBlocks = 3;

}  // namespace ssm
