// Torch binding of the selective scan kernels: module mamba_ssm._selective_scan_cuda.
//
//   fwd(u, delta, A, B, C, D?, z?, delta_bias?, softplus, R, save_ckpt, save_y)
//       -> [out, last_state, ckpt, y]
//   bwd(u, delta, A, B, C, D?, z?, delta_bias?, softplus, R, ckpt, dout, dlast?, y?)
//       -> [du, ddelta, dA, dB, dC, dD?, dz?, ddelta_bias?]
//   fwd_plan(u, delta, A, B, C, D?, z?, delta_bias?, softplus, R) -> {kernel, full, d16, ...}
//
// u, delta, z, dout share one dtype (fp32/fp16/bf16); B and C are that dtype or fp32 (if
// either is fp32 both are read as fp32); A, D, delta_bias fp32. Any strides are accepted:
// tensors whose last stride is not 1 are copied. With MAMBA_SSM_POISON=1 in the
// environment every output is filled with NaN before the launch (tests use it to prove
// that the kernels write every element).
#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "scan_params.h"

namespace {

using at::Tensor;

// An on/off setting from the environment: on when it starts with '1'.
bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] == '1';
}

bool poison_enabled() { return env_flag("MAMBA_SSM_POISON"); }

Tensor new_out(at::IntArrayRef shape, const at::TensorOptions& opt, bool poison) {
  Tensor t = at::empty(shape, opt);
  if (poison) t.fill_(std::numeric_limits<float>::quiet_NaN());
  return t;
}

Tensor last_contig(const Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

ssm::DType dtype_code(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return ssm::DType::kF32;
    case at::kHalf: return ssm::DType::kF16;
    case at::kBFloat16: return ssm::DType::kBF16;
    default: TORCH_CHECK(false, "selective_scan_cuda: u must be float32, float16 or bfloat16, got ", st);
  }
  return ssm::DType::kF32;
}

bool aligned16(const Tensor& t, int64_t elem_bytes, int64_t s0, int64_t s1, int64_t s2) {
  auto ok = [&](int64_t s) { return (s * elem_bytes) % 16 == 0; };
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && ok(s0) && ok(s1) && ok(s2);
}

int pick_cpb(int dpg, int cpb_max) {
  int c = 1;
  while (c * 2 <= cpb_max && dpg % (c * 2) == 0) c *= 2;
  return c;
}

// A grid of one wave or more loses the idle part of its last one (1.29 waves of blocks run as
// 2). Splitting the sequence in s groups gives s times as many blocks, each s times shorter:
// take the s in 1..4 with the least estimated time ceil(waves * s) / s, a split charged 15% for
// its carry pass (measured 9-11% at (8,1536,2048,16), where splitting gained no wave). Below one
// wave the estimate does not hold (fewer warps per SM each run faster), so no split there.
// Measured for the backward only (run 8 in NOTES.md: LoRA 1.4b at 4 x 2048, 1.29 waves, split 3).
int64_t wave_balanced_split(int64_t warps, int64_t warps_per_wave) {
  if (warps < warps_per_wave) return 1;
  double best = std::ceil((double)warps / warps_per_wave);
  int64_t n = 1;
  for (int64_t s = 2; s <= 4; ++s) {
    const double t = std::ceil((double)warps * s / warps_per_wave) / s * 1.15;
    if (t < best - 1e-9) {
      best = t;
      n = s;
    }
  }
  return n;
}

// Split along the sequence when batch * dim alone gives less than half a wave of warps (e.g.
// batch 1, long sequences): then about two waves. Measured on an H200: (1,4096,16384,16) backward
// 9.6 -> 6.3 ms with 7 groups; (8,1536,2048,16), 0.97 waves unsplit, was slower split in 3
// (1.62 -> 1.77 ms), hence the half-wave threshold. The forward (16 resident warps per SM) splits
// the same way (run 6 in NOTES.md); the backward (12) also when a split fills its last wave better
// (balance_waves). With balance_waves the small-grid count is rounded down to whole waves: at
// (1,4096,16384,16) the backward's 7 groups (2.26 waves, run as 3) took 4.46 ms, 6 groups (1.94
// waves) 3.65 ms, same call (selective_scan_h200_2026-11-29_split_sweep.json; 3 and 12 groups,
// also whole waves, 3.85 and 3.64). MAMBA_SSM_SCAN_SPLIT=n forces n groups (1: never split).
int sm_count() {
  int sms = 132;
  int dev = 0;
  if (cudaGetDevice(&dev) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  return sms;
}

// Warps of a launch giving each channel `lanes` threads, and whether they fill less than half of
// the two waves the kernels are sized for (the sequence split's threshold, below).
int64_t grid_warps(const ssm::ScanParams& p, int lanes) { return ((int64_t)p.batch * p.dim * lanes + 31) / 32; }
bool small_grid(const ssm::ScanParams& p, int lanes, int resident_warps_per_sm) {
  return 4 * grid_warps(p, lanes) < 2LL * resident_warps_per_sm * sm_count();
}

void pick_split(ssm::ScanParams& p, int resident_warps_per_sm, bool balance_waves, int lanes = 4) {
  p.nsplit = 1;
  p.gseg = std::max(1, p.nseg);
  if (p.batch <= 0 || p.dim <= 0 || p.nseg <= 0) return;  // empty input: nothing is launched
  const int sms = sm_count();
  const int64_t warps = grid_warps(p, lanes);
  const int64_t want = 2LL * resident_warps_per_sm * sms;
  int64_t n = 1;
  if (const char* v = std::getenv("MAMBA_SSM_SCAN_SPLIT")) n = std::max(1L, std::atol(v));
  else if (small_grid(p, lanes, resident_warps_per_sm)) n = balance_waves ? want / warps : (want + warps - 1) / warps;
  else if (balance_waves) n = wave_balanced_split(warps, (int64_t)resident_warps_per_sm * sms);
  n = std::min<int64_t>({n, 64, p.nseg});
  p.gseg = (int)((p.nseg + n - 1) / n);
  p.nsplit = (p.nseg + p.gseg - 1) / p.gseg;  // no empty group
}

// The forward's time-parallel layout (scan_fwd_tp.cuh: 16 lanes per channel, dstate <= 16, no
// exponential computed twice). By default (or MAMBA_SSM_SCAN_FWD_TP=auto) where fwd2's 4 lanes per
// channel would leave the GPU mostly idle and split the sequence (batch 1: prefill); where both fill
// the GPU fwd2 is faster (tp took 1.54x its time at (8,4096,2048,16), run 23). =1: wherever it applies
// (tests); =0: never. Blocks of 8 channels where 8 divides dim / groups, else 4;
// MAMBA_SSM_SCAN_TP_CPB=16 allows blocks of 16, =4 caps them at 4. At (1,4096,16384,16) 8-channel
// blocks (4 warps at each barrier) took 0.825 ms against 0.881 for 16 (run 24, H100).
bool use_fwd_tp(ssm::ScanParams& p) {
  const int dpg = p.dim / p.groups;
  if (p.dstate > 16 || dpg % 4 != 0) return false;
  const char* cap_env = std::getenv("MAMBA_SSM_SCAN_TP_CPB");
  const int cap = cap_env ? std::atoi(cap_env) : 8;
  p.tp_cpb = 4;
  for (int c : {16, 8})
    if (p.tp_cpb == 4 && c <= cap && dpg % c == 0) p.tp_cpb = c;
  const char* mode = std::getenv("MAMBA_SSM_SCAN_FWD_TP");
  if (mode == nullptr || std::string(mode) == "auto") return small_grid(p, 4, 16);
  return env_flag("MAMBA_SSM_SCAN_FWD_TP");
}

struct Prepared {
  Tensor u, delta, z, B, C, A, D, bias;
  bool w_f32 = false;
  bool grouped_B = false, grouped_C = false;
  ssm::ScanParams p;
};

Prepared prepare(const Tensor& u_in, const Tensor& delta_in, const Tensor& A_in, const Tensor& B_in,
                 const Tensor& C_in, const std::optional<Tensor>& D_in, const std::optional<Tensor>& z_in,
                 const std::optional<Tensor>& bias_in, bool softplus, int64_t R) {
  TORCH_CHECK(u_in.is_cuda(), "selective_scan_cuda: inputs must be CUDA tensors");
  TORCH_CHECK(u_in.dim() == 3, "selective_scan_cuda: u must be (batch, dim, seqlen)");
  Prepared q;
  const auto st = u_in.scalar_type();
  dtype_code(st);
  q.u = last_contig(u_in);
  q.delta = last_contig(delta_in.scalar_type() == st ? delta_in : delta_in.to(st));
  const int64_t batch = u_in.size(0), dim = u_in.size(1), L = u_in.size(2);
  TORCH_CHECK(A_in.dim() == 2 && A_in.size(0) == dim, "selective_scan_cuda: A must be (dim, dstate)");
  const int64_t N = A_in.size(1);
  TORCH_CHECK(N >= 1 && N <= 256, "selective_scan_cuda: dstate must be in [1, 256], got ", N);
  TORCH_CHECK(!A_in.is_complex() && !B_in.is_complex() && !C_in.is_complex(),
              "selective_scan_cuda: complex inputs are not supported");
  q.A = A_in.to(at::kFloat).contiguous();
  q.w_f32 = B_in.scalar_type() == at::kFloat || C_in.scalar_type() == at::kFloat || st == at::kFloat;
  const auto wt = q.w_f32 ? at::kFloat : st;
  q.B = last_contig(B_in.scalar_type() == wt ? B_in : B_in.to(wt));
  q.C = last_contig(C_in.scalar_type() == wt ? C_in : C_in.to(wt));
  q.grouped_B = q.B.dim() == 4;
  q.grouped_C = q.C.dim() == 4;
  const int64_t G = q.grouped_B ? q.B.size(1) : (q.grouped_C ? q.C.size(1) : 1);
  if (q.grouped_B && q.grouped_C)
    TORCH_CHECK(q.B.size(1) == q.C.size(1), "selective_scan_cuda: B and C must have the same number of groups");
  // A 3-dim B/C next to a grouped one behaves as one group repeated: stride 0 over groups.
  TORCH_CHECK(dim % G == 0, "selective_scan_cuda: groups must divide dim");
  if (D_in.has_value()) q.D = D_in->to(at::kFloat).contiguous();
  if (bias_in.has_value()) q.bias = bias_in->to(at::kFloat).contiguous();
  if (z_in.has_value()) q.z = last_contig(z_in->scalar_type() == st ? *z_in : z_in->to(st));

  auto& p = q.p;
  p.batch = (int)batch; p.dim = (int)dim; p.seqlen = (int)L; p.dstate = (int)N; p.groups = (int)G;
  p.spl = (int)((N + 15) / 16);
  TORCH_CHECK(R >= 1 && R <= 64, "selective_scan_cuda: R must be in [1, 64]");
  p.R = (int)R;
  const int nchunks = (int)((L + 15) / 16);
  p.nseg = (nchunks + p.R - 1) / p.R;
  p.softplus = softplus;
  p.u = q.u.data_ptr(); p.u_b = q.u.stride(0); p.u_d = q.u.stride(1);
  p.delta = q.delta.data_ptr(); p.dl_b = q.delta.stride(0); p.dl_d = q.delta.stride(1);
  if (q.z.defined()) { p.z = q.z.data_ptr(); p.z_b = q.z.stride(0); p.z_d = q.z.stride(1); }
  const int64_t we = q.w_f32 ? 4 : 2;
  if (q.grouped_B) { p.B_b = q.B.stride(0); p.B_g = q.B.stride(1); p.B_s = q.B.stride(2); }
  else { p.B_b = q.B.stride(0); p.B_g = 0; p.B_s = q.B.stride(1); }
  if (q.grouped_C) { p.C_b = q.C.stride(0); p.C_g = q.C.stride(1); p.C_s = q.C.stride(2); }
  else { p.C_b = q.C.stride(0); p.C_g = 0; p.C_s = q.C.stride(1); }
  p.B = q.B.data_ptr(); p.C = q.C.data_ptr();
  p.vec_B = aligned16(q.B, we, p.B_b, p.B_g, p.B_s);
  p.vec_C = aligned16(q.C, we, p.C_b, p.C_g, p.C_s);
  auto x_ok = [](const Tensor& t) {
    const int64_t es = t.element_size();
    return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && (t.stride(0) * es) % 16 == 0 &&
           (t.stride(1) * es) % 16 == 0;
  };
  p.vec_x = x_ok(q.u) && x_ok(q.delta) && (!q.z.defined() || x_ok(q.z));
  p.vec_o = (L % 4) == 0;
  p.exact_softplus = env_flag("MAMBA_SSM_SCAN_EXACT_SOFTPLUS");
  p.A = q.A.data_ptr<float>();
  p.D = q.D.defined() ? q.D.data_ptr<float>() : nullptr;
  p.bias = q.bias.defined() ? q.bias.data_ptr<float>() : nullptr;
  return q;
}

void launch_fwd(ssm::ScanParams& p, at::ScalarType st, bool w_f32, cudaStream_t s) {
  switch (dtype_code(st)) {
    case ssm::DType::kF32: ssm::scan_fwd_f32(p, w_f32, s); break;
    case ssm::DType::kF16: ssm::scan_fwd_f16(p, w_f32, s); break;
    case ssm::DType::kBF16: ssm::scan_fwd_bf16(p, w_f32, s); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_bwd(ssm::ScanParams& p, at::ScalarType st, bool w_f32, cudaStream_t s) {
  switch (dtype_code(st)) {
    case ssm::DType::kF32: ssm::scan_bwd_f32(p, w_f32, s); break;
    case ssm::DType::kF16: ssm::scan_bwd_f16(p, w_f32, s); break;
    case ssm::DType::kBF16: ssm::scan_bwd_bf16(p, w_f32, s); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The forward's launch choices: kernel layout, channels per block, sequence split.
void plan_fwd(ssm::ScanParams& p) {
  p.cpb = pick_cpb(p.dim / p.groups, 16);
  p.fwd_tp = use_fwd_tp(p);
  pick_split(p, 16, false, p.fwd_tp ? 16 : 4);
}

// What fwd would launch for these inputs and the present environment, without launching it
// (tests and benchmarks: which kernel, whether its bounds-check-free instantiation, the split).
py::dict fwd_plan(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C,
                  const std::optional<Tensor>& D, const std::optional<Tensor>& z,
                  const std::optional<Tensor>& delta_bias, bool softplus, int64_t R) {
  const c10::cuda::CUDAGuard guard(u.device());
  Prepared q = prepare(u, delta, A, B, C, D, z, delta_bias, softplus, R);
  auto& p = q.p;
  plan_fwd(p);
  py::dict d;
  d["kernel"] = p.fwd_tp ? "fwd_tp" : "fwd2";
  d["full"] = p.fwd_tp ? ssm::fwd_tp_full(p) : ssm::fwd2_full(p);
  d["d16"] = !p.fwd_tp && ssm::fwd2_d16(p);
  d["channels_per_block"] = p.fwd_tp ? p.tp_cpb : p.cpb;
  d["nsplit"] = p.nsplit;
  return d;
}

std::vector<Tensor> fwd(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C,
                        const std::optional<Tensor>& D, const std::optional<Tensor>& z,
                        const std::optional<Tensor>& delta_bias, bool softplus, int64_t R, bool save_ckpt,
                        bool save_y) {
  const c10::cuda::CUDAGuard guard(u.device());
  Prepared q = prepare(u, delta, A, B, C, D, z, delta_bias, softplus, R);
  auto& p = q.p;
  plan_fwd(p);
  const bool poison = poison_enabled();
  const auto f32 = u.options().dtype(at::kFloat);
  Tensor out = new_out({p.batch, p.dim, p.seqlen}, u.options(), poison);
  Tensor last = new_out({p.batch, p.dim, p.dstate}, f32, poison);
  Tensor ckpt;
  if (save_ckpt) ckpt = new_out({p.batch, p.dim, p.nseg, p.dstate}, f32, poison);
  // y before the z gate, for the backward's dz (without z, dz does not exist)
  Tensor y;
  if (save_ckpt && save_y && q.z.defined()) y = new_out({p.batch, p.dim, p.seqlen}, u.options(), poison);
  Tensor carry_w, carry_sdt;
  if (p.nsplit > 1) {
    carry_w = new_out({p.nsplit, p.batch, p.dim, p.dstate}, f32, poison);
    carry_sdt = new_out({p.nsplit, p.batch, p.dim}, f32, poison);
    p.carry_w = carry_w.data_ptr<float>();
    p.carry_sdt = carry_sdt.data_ptr<float>();
  }
  p.out = out.data_ptr();
  p.last = last.data_ptr<float>();
  p.ckpt = save_ckpt ? ckpt.data_ptr<float>() : nullptr;
  p.y = y.defined() ? y.data_ptr() : nullptr;
  if (p.batch > 0 && p.dim > 0 && p.seqlen > 0)
    launch_fwd(p, u.scalar_type(), q.w_f32, c10::cuda::getCurrentCUDAStream().stream());
  else
    last.zero_();
  return {out, last, ckpt, y};
}

std::vector<std::optional<Tensor>> bwd(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B,
                                       const Tensor& C, const std::optional<Tensor>& D,
                                       const std::optional<Tensor>& z, const std::optional<Tensor>& delta_bias,
                                       bool softplus, int64_t R, const Tensor& ckpt, const Tensor& dout_in,
                                       const std::optional<Tensor>& dlast_in, const std::optional<Tensor>& y_in) {
  const c10::cuda::CUDAGuard guard(u.device());
  Prepared q = prepare(u, delta, A, B, C, D, z, delta_bias, softplus, R);
  auto& p = q.p;
  const int dpg = p.dim / p.groups;
  // largest power-of-two channel count (<= 32) whose shared memory leaves room for 2 blocks per SM
  int cap = 32;
  while (cap > 1) {
    p.cpb = cap;
    if (ssm::scan_bwd2_smem_floats(p) * 4 <= 110 * 1024) break;
    cap /= 2;
  }
  p.cpb = pick_cpb(dpg, cap);
  const int P = dpg / p.cpb;
  pick_split(p, 12, true);
  const bool poison = poison_enabled();
  const auto st = u.scalar_type();
  const auto f32 = u.options().dtype(at::kFloat);
  Tensor dout = last_contig(dout_in.scalar_type() == st ? dout_in : dout_in.to(st));
  Tensor dlast;
  if (dlast_in.has_value()) dlast = dlast_in->to(at::kFloat).contiguous();
  TORCH_CHECK(ckpt.is_contiguous() && ckpt.size(2) == p.nseg, "selective_scan_cuda: bad checkpoint tensor");

  Tensor du = new_out({p.batch, p.dim, p.seqlen}, u.options(), poison);
  Tensor ddelta = new_out({p.batch, p.dim, p.seqlen}, u.options(), poison);
  Tensor dz;
  if (q.z.defined()) dz = new_out({p.batch, p.dim, p.seqlen}, u.options(), poison);
  Tensor dBpart = new_out({P, p.batch, p.groups, p.seqlen, p.dstate}, f32, poison);
  Tensor dCpart = new_out({P, p.batch, p.groups, p.seqlen, p.dstate}, f32, poison);
  Tensor dApart = new_out({p.nsplit, p.batch, p.dim, p.dstate}, f32, poison);
  Tensor dDpart = new_out({p.nsplit, p.batch, p.dim}, f32, poison);
  Tensor dbpart = new_out({p.nsplit, p.batch, p.dim}, f32, poison);
  Tensor carry_w, carry_sdt;
  if (p.nsplit > 1) {
    carry_w = new_out({p.nsplit, p.batch, p.dim, p.dstate}, f32, poison);
    carry_sdt = new_out({p.nsplit, p.batch, p.dim}, f32, poison);
    p.carry_w = carry_w.data_ptr<float>();
    p.carry_sdt = carry_sdt.data_ptr<float>();
  }

  p.dout = dout.data_ptr(); p.do_b = dout.stride(0); p.do_d = dout.stride(1);
  {
    const int64_t es = dout.element_size();
    p.vec_x = p.vec_x && reinterpret_cast<uintptr_t>(dout.data_ptr()) % 16 == 0 && (dout.stride(0) * es) % 16 == 0 &&
              (dout.stride(1) * es) % 16 == 0;
  }
  p.dlast = dlast.defined() ? dlast.data_ptr<float>() : nullptr;
  p.ckpt_in = ckpt.data_ptr<float>();
  // the forward's y before the z gate, if it saved one: dz from it instead of recomputing y
  if (y_in.has_value() && y_in->defined() && q.z.defined()) {
    TORCH_CHECK(y_in->sizes() == u.sizes() && y_in->is_contiguous() && y_in->scalar_type() == st,
                "selective_scan_cuda: the saved y must be a contiguous (batch, dim, seqlen) tensor of u's dtype");
    p.y = y_in->data_ptr();
  }
  p.du = du.data_ptr(); p.ddelta = ddelta.data_ptr();
  p.dz = dz.defined() ? dz.data_ptr() : nullptr;
  p.dBpart = dBpart.data_ptr<float>(); p.dCpart = dCpart.data_ptr<float>();
  p.dApart = dApart.data_ptr<float>(); p.dDpart = dDpart.data_ptr<float>(); p.dbiaspart = dbpart.data_ptr<float>();
  if (p.batch > 0 && p.dim > 0 && p.seqlen > 0) {
    launch_bwd(p, st, q.w_f32, c10::cuda::getCurrentCUDAStream().stream());
  } else {
    dBpart.zero_(); dCpart.zero_(); dApart.zero_(); dDpart.zero_(); dbpart.zero_();
  }

  // Fixed-order reductions of the partials (deterministic).
  Tensor dB = dBpart.sum(0).transpose(-1, -2);  // (batch, groups, L, N) -> (batch, groups, N, L)
  Tensor dC = dCpart.sum(0).transpose(-1, -2);
  if (!q.grouped_B) dB = p.groups == 1 ? dB.squeeze(1) : dB.sum(1);
  if (!q.grouped_C) dC = p.groups == 1 ? dC.squeeze(1) : dC.sum(1);
  dB = dB.to(B.scalar_type()).contiguous();
  dC = dC.to(C.scalar_type()).contiguous();
  Tensor dA = dApart.sum(at::IntArrayRef{0, 1}).to(A.scalar_type());
  std::optional<Tensor> dD, dbias, dz_out;
  if (D.has_value()) dD = dDpart.sum(at::IntArrayRef{0, 1}).to(D->scalar_type());
  if (delta_bias.has_value()) dbias = dbpart.sum(at::IntArrayRef{0, 1}).to(delta_bias->scalar_type());
  if (dz.defined()) dz_out = z->scalar_type() == st ? dz : dz.to(z->scalar_type());
  Tensor ddelta_out = delta.scalar_type() == st ? ddelta : ddelta.to(delta.scalar_type());
  return {du, ddelta_out, dA, dB, dC, dD, dz_out, dbias};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mamba_ssm selective scan CUDA kernels (forward, backward)";
  m.def("fwd", &fwd, "selective scan forward");
  m.def("bwd", &bwd, "selective scan backward");
  m.def("fwd_plan", &fwd_plan, "the forward's launch plan for these inputs (kernel, full, d16, channels_per_block, nsplit)");
}
