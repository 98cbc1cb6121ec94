// Plain-C++ description of one selective-scan launch, shared by the torch binding and the
// CUDA translation units (which do not include torch headers, to keep builds short).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cuda_runtime.h>

namespace ssm {

enum class DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

struct ScanParams {
  int batch = 0, dim = 0, seqlen = 0, dstate = 0, groups = 1;
  int cpb = 1;    // channels per block (divides dim / groups)
  int spl = 1;    // state slots per lane = ceil(dstate / 16)
  int R = 4;      // sub-chunks of 16 steps per checkpoint segment
  int nseg = 0;   // ceil(ceil(seqlen / 16) / R)
  bool softplus = false;
  bool exact_softplus = false;  // log1pf instead of the special-function-unit softplus
  bool vec_B = false, vec_C = false;  // B / C rows 16-byte aligned
  bool vec_x = false;  // u, delta, z, dout rows 16-byte aligned (vector loads)
  bool vec_o = false;  // freshly allocated (batch, dim, seqlen) outputs allow 4-element stores
  bool fwd_tp = false;  // the forward in the time-parallel layout (scan_fwd_tp.cuh; dstate <= 16)
  int tp_cpb = 4;       // its channels per block: 4, 8 or 16 (dividing dim / groups)
  // Unused, so that the pointers start at byte 64 as when the kernels were tuned: a layout 8 bytes
  // shorter changed bwd2's register allocation and spills (ptxas, check_build.sh).
  int unused_[4] = {0, 0, 0, 0};

  // Inputs. u, delta, z, dout: (batch, dim, seqlen), last stride 1, strides in elements.
  const void* u = nullptr;      int64_t u_b = 0, u_d = 0;
  const void* delta = nullptr;  int64_t dl_b = 0, dl_d = 0;
  const void* z = nullptr;      int64_t z_b = 0, z_d = 0;
  // B, C: (batch, groups, dstate, seqlen) strides (groups stride 0 when not grouped).
  const void* B = nullptr;      int64_t B_b = 0, B_g = 0, B_s = 0;
  const void* C = nullptr;      int64_t C_b = 0, C_g = 0, C_s = 0;
  const float* A = nullptr;     // (dim, dstate) contiguous
  const float* D = nullptr;     // (dim,) or null
  const float* bias = nullptr;  // (dim,) or null

  // Forward outputs.
  void* out = nullptr;          // (batch, dim, seqlen) contiguous, u's dtype
  float* last = nullptr;        // (batch, dim, dstate)
  float* ckpt = nullptr;        // (batch, dim, nseg, dstate) state at each segment start, or null
  // y = C h + D u before the z gate, (batch, dim, seqlen) contiguous, u's dtype, or null: written
  // by the forward when set, read by the backward for dz instead of recomputing it.
  void* y = nullptr;

  // Backward.
  const void* dout = nullptr;   int64_t do_b = 0, do_d = 0;
  const float* dlast = nullptr; // (batch, dim, dstate) contiguous or null
  const float* ckpt_in = nullptr;
  void* du = nullptr;           // (batch, dim, seqlen) contiguous
  void* ddelta = nullptr;
  void* dz = nullptr;
  float* dBpart = nullptr;      // (P, batch, groups, seqlen, dstate), P = dim / groups / cpb
  float* dCpart = nullptr;
  float* dApart = nullptr;      // (nsplit, batch, dim, dstate)
  float* dDpart = nullptr;      // (nsplit, batch, dim)
  float* dbiaspart = nullptr;   // (nsplit, batch, dim)

  // Split along the sequence (for grids too small to fill the GPU): group z
  // covers checkpoint segments [z * gseg, (z + 1) * gseg). A first kernel computes, for each
  // group z >= 1 alone (zero incoming gradient), the gradient it passes to the state before
  // it (carry_w) and its sum of dt (carry_sdt); each group then starts from
  // g = dlast, g = exp(A * sdt_z') * g + w_z' for z' = nsplit-1 .. z+1.
  int nsplit = 1, gseg = 1;
  float* carry_w = nullptr;     // (nsplit, batch, dim, dstate)
  float* carry_sdt = nullptr;   // (nsplit, batch, dim)

  // Packed sequences (mamba_ssm/ops/packing.py), or null: seq_idx (batch, seqlen) int32, last
  // stride 1. Where it changes along a row the decay of the carried state is 0 (a zero state; no
  // gradient flows back across). Null runs the unpacked instantiations (kSeq, scan_common.cuh).
  const int* seq_idx = nullptr;  int64_t si_b = 0;
  // Each sequence's final state (cu_seqlens: batch 1, seq_idx numbering the sequences 0, 1, ...):
  // the forward writes, at each start t, the state at t - 1 to seq_last[seq_idx[t - 1]] (nseq,
  // dim, dstate); the backward adds dseq_last there to the gradient entering h_{t-1}. The last
  // sequence's is the row's (last, dlast). Null: none.
  float* seq_last = nullptr;
  const float* dseq_last = nullptr;
  int nseq = 0;
};
static_assert(offsetof(ScanParams, u) == 64, "the kernels were tuned with this layout (see unused_)");

// Implemented in scan_fwd_*.cu / scan_bwd_*.cu. w_f32: B and C are fp32 (else u's dtype).
void scan_fwd_f32(ScanParams& p, bool w_f32, cudaStream_t stream);
void scan_fwd_f16(ScanParams& p, bool w_f32, cudaStream_t stream);
void scan_fwd_bf16(ScanParams& p, bool w_f32, cudaStream_t stream);
void scan_bwd_f32(ScanParams& p, bool w_f32, cudaStream_t stream);
void scan_bwd_f16(ScanParams& p, bool w_f32, cudaStream_t stream);
void scan_bwd_bf16(ScanParams& p, bool w_f32, cudaStream_t stream);

// Threads of a fwd2 / bwd2 block: 4 lanes per channel.
inline int scan_threads(const ScanParams& p) { return p.cpb * 4; }

// Shared-memory sizes (floats).
inline int scan2_bw(const ScanParams& p) { return p.spl * 16 + 4; }
inline int scan_fwd2_smem_floats(const ScanParams& p) {
  return 2 * 2 * 16 * scan2_bw(p) + 2 * p.cpb * 2 * 20 + 4 * p.spl * scan_threads(p);
}
// The forward's branch-free instantiation applies: whole sub-chunks, aligned rows, whole state
// slots, z given, the default softplus on delta.
inline bool fwd2_full(const ScanParams& p) {
  return p.vec_x && p.vec_B && p.vec_C && p.vec_o && p.seqlen % 16 == 0 && p.dstate % 16 == 0 &&
         p.z != nullptr && p.softplus && !p.exact_softplus;
}
// fwd2's instantiation for Mamba's shape on top of fwd2_full: dstate 16 and 16-channel blocks.
inline bool fwd2_d16(const ScanParams& p) { return fwd2_full(p) && p.dstate == 16 && p.cpb == 16; }
// The time-parallel forward's (scan_fwd_tp.cuh) branch-free instantiation: fwd2_full's conditions,
// dstate 16 exactly, a checkpoint every 16-step chunk (R == 1: two per sub-chunk, stored without
// tests), and every sequence group a whole number of its 32-step sub-chunks.
inline bool fwd_tp_full(const ScanParams& p) {
  return fwd2_full(p) && p.dstate == 16 && p.R == 1 && p.seqlen % 32 == 0 && (p.nsplit == 1 || p.gseg % 2 == 0);
}
inline int scan2_carry_smem_floats(const ScanParams& p) {
  return 16 * scan2_bw(p) + p.cpb * 2 * 20 + 4 * p.spl * scan_threads(p);
}

// Backward dB/dC reduction over a block's channels, from the shape: 2 (dstate <= 16, blocks of 8+
// channels) over a warp's 8 channels by shuffles on lane-permuted state orders (it stages 4
// permuted copies of B and C); 1 (several state slots) the same with selects; 0 (blocks of fewer
// than 8 channels) per channel in shared memory.
inline int scan_bwd2_red_mode(const ScanParams& p) {
  if (p.cpb < 8) return 0;
  return p.spl == 1 ? 2 : 1;
}
// Reduction slots: one per warp when its 8 channels are summed by shuffles first, else one per channel.
inline int scan_bwd2_red_slots(const ScanParams& p) { return scan_bwd2_red_mode(p) ? p.cpb / 8 : p.cpb; }
// Staged B/C: one [2][16][BW] array, or (mode 2) 4 permuted copies, each kBwd2CopyPad floats
// further along the banks than the last so that the two copies a quarter-warp reads from do not
// share banks.
constexpr int kBwd2CopyPad = 16;
// dB/dC reduction rows: dC starts kBwd2RedPad floats past the end of dB (lanes c and c + 4 of a
// warp store dB and dC of the same state and step, which would otherwise share a bank).
constexpr int kBwd2RedPad = 16;
inline int scan_bwd2_bc_floats(const ScanParams& p) {
  return scan_bwd2_red_mode(p) == 2 ? 4 * (2 * 16 * scan2_bw(p) + kBwd2CopyPad) : 2 * 16 * scan2_bw(p);
}
inline int scan_bwd2_smem_floats(const ScanParams& p) {
  const int nthr = scan_threads(p);
  return scan_bwd2_bc_floats(p) + p.cpb * 3 * 20 + 4 * (p.R + 2) * p.spl * nthr +
         4 * 16 * nthr + scan_bwd2_red_slots(p) * 2 * (16 * scan2_bw(p) + kBwd2RedPad);
}

}  // namespace ssm
