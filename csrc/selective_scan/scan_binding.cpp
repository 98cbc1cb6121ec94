// Torch binding of the selective scan kernels: module mamba_ssm._selective_scan_cuda.
//
//   fwd(u, delta, A, B, C, D?, z?, delta_bias?, softplus, R, save_ckpt, save_y,
//       fwd_tp, cpb, tp_cpb, nsplit, gseg, exact_softplus, poison, seq_idx?, nseq)
//       -> [out, last_state, ckpt, y]
//   bwd(u, delta, A, B, C, D?, z?, delta_bias?, softplus, R, ckpt, dout, dlast?, y?,
//       cpb, nsplit, gseg, exact_softplus, poison, seq_idx?, dseq_last?)
//       -> [du, ddelta, dA, dB, dC, dD?, dz?, ddelta_bias?]
//   fwd_instantiation(u, delta, A, B, C, D?, z?, delta_bias?, softplus, R,
//       fwd_tp, cpb, tp_cpb, nsplit, gseg, exact_softplus) -> {full, d16}
//
// The launch plan (fwd_tp, cpb, tp_cpb, nsplit, gseg) comes from mamba_ssm/ops/selective_scan_plan.py
// and the settings (R, exact_softplus, poison) from selective_scan_settings.py; here they are only
// checked. The kernel instantiation (bounds-checked or not, dstate 16) follows from alignment and
// shape. u, delta, z, dout share one dtype (fp32/fp16/bf16); B and C are that dtype or fp32 (if
// either is fp32 both are read as fp32); A, D, delta_bias fp32. Any strides are accepted: tensors
// whose last stride is not 1 are copied. poison: every output is filled with NaN before the launch
// (tests use it to prove that the kernels write every element).
// Packed sequences (mamba_ssm/ops/packing.py): seq_idx (batch, seqlen) int32, the state reset where
// it changes. nseq > 0 (batch 1, seq_idx numbering the sequences 0..nseq-1, as packing derives it
// from cu_seqlens): last_state is each sequence's final state (nseq, dim, dstate), and the
// backward's dlast is the last sequence's gradient, dseq_last (nseq, dim, dstate) all of them.
#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <string>
#include <type_traits>
#include <optional>
#include <vector>

#include "scan_params.h"

namespace {

using at::Tensor;

// Error messages are put together here without iostreams. On the H100 image of 2026-12-07 the
// extension carried its own copies of libstdc++'s stream templates, and formatting a number
// through them (c10::str streams every argument) crashed the process instead of raising. Given
// one C string, TORCH_CHECK formats nothing in this library.
void append(std::string& s, const char* v) { s += v; }
void append(std::string& s, const std::string& v) { s += v; }
template <typename T, typename = std::enable_if_t<std::is_integral_v<T>>>
void append(std::string& s, T v) { s += std::to_string(v); }
template <typename... Args>
std::string message(const Args&... args) {
  std::string s;
  (append(s, args), ...);
  return s;
}
#define SCAN_CHECK(cond, ...) TORCH_CHECK(cond, message(__VA_ARGS__).c_str())

Tensor new_out(at::IntArrayRef shape, const at::TensorOptions& opt, bool poison) {
  Tensor t = at::empty(shape, opt);
  if (poison) t.fill_(std::numeric_limits<float>::quiet_NaN());
  return t;
}

Tensor last_contig(const Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

std::string shape_of(const Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + (t.dim() == 1 ? ",)" : ")");
}

ssm::DType dtype_code(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return ssm::DType::kF32;
    case at::kHalf: return ssm::DType::kF16;
    case at::kBFloat16: return ssm::DType::kBF16;
    default: SCAN_CHECK(false, "selective_scan_cuda: u must be float32, float16 or bfloat16, got ", c10::toString(st));
  }
  return ssm::DType::kF32;
}

bool aligned16(const Tensor& t, int64_t elem_bytes, int64_t s0, int64_t s1, int64_t s2) {
  auto ok = [&](int64_t s) { return (s * elem_bytes) % 16 == 0; };
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && ok(s0) && ok(s1) && ok(s2);
}

int max_smem_optin() {
  int dev = 0, bytes = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return bytes;
}

// Checks of the plan's integers (selective_scan_plan.py chooses them).
void check_cpb(const char* name, int64_t cpb, int64_t cpb_max, const ssm::ScanParams& p) {
  const int64_t dpg = p.dim / p.groups;
  SCAN_CHECK(cpb >= 1 && cpb <= cpb_max && (cpb & (cpb - 1)) == 0 && dpg % cpb == 0, "selective_scan_cuda: ", name,
              "=", cpb, " must be a power of two <= ", cpb_max, " dividing dim / groups = ", dpg);
}

void set_split(ssm::ScanParams& p, int64_t nsplit, int64_t gseg) {
  SCAN_CHECK(gseg >= 1 && nsplit == std::max<int64_t>(1, (p.nseg + gseg - 1) / gseg), "selective_scan_cuda: nsplit=",
              nsplit, ", gseg=", gseg, " must cut the ", p.nseg, " segments into groups of gseg, none empty");
  p.nsplit = (int)nsplit;
  p.gseg = (int)gseg;
}

void check_smem(const char* kernel, int64_t floats) {
  const int64_t limit = max_smem_optin();
  SCAN_CHECK(floats * 4 <= limit, "selective_scan_cuda: ", kernel, " would need ", floats * 4,
              " bytes of shared memory per block, the device allows ", limit, ": use fewer channels per block");
}

// The forward's plan, checked: fwd2 (or the split's carry pass) in blocks of cpb channels, or the
// time-parallel layout (dstate <= 16) in blocks of tp_cpb (4, 8 or 16) channels.
void set_fwd_plan(ssm::ScanParams& p, bool fwd_tp, int64_t cpb, int64_t tp_cpb, int64_t nsplit, int64_t gseg) {
  check_cpb("cpb", cpb, 16, p);
  p.cpb = (int)cpb;
  p.fwd_tp = fwd_tp;
  if (fwd_tp) {
    SCAN_CHECK(p.dstate <= 16, "selective_scan_cuda: the time-parallel forward needs dstate <= 16, got ", p.dstate);
    SCAN_CHECK(tp_cpb == 4 || tp_cpb == 8 || tp_cpb == 16, "selective_scan_cuda: tp_cpb=", tp_cpb,
                " must be 4, 8 or 16");
    check_cpb("tp_cpb", tp_cpb, 16, p);
    p.tp_cpb = (int)tp_cpb;
  }
  set_split(p, nsplit, gseg);
  check_smem("the forward", ssm::scan_fwd2_smem_floats(p));
}

struct Prepared {
  Tensor u, delta, z, B, C, A, D, bias, seq_idx;
  bool w_f32 = false;
  bool grouped_B = false, grouped_C = false;
  ssm::ScanParams p;
};

Prepared prepare(const Tensor& u_in, const Tensor& delta_in, const Tensor& A_in, const Tensor& B_in,
                 const Tensor& C_in, const std::optional<Tensor>& D_in, const std::optional<Tensor>& z_in,
                 const std::optional<Tensor>& bias_in, bool softplus, int64_t R, bool exact_softplus) {
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
  SCAN_CHECK(N >= 1 && N <= 256, "selective_scan_cuda: dstate must be in [1, 256], got ", N);
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
  p.exact_softplus = exact_softplus;
  p.A = q.A.data_ptr<float>();
  p.D = q.D.defined() ? q.D.data_ptr<float>() : nullptr;
  p.bias = q.bias.defined() ? q.bias.data_ptr<float>() : nullptr;
  return q;
}

// Packed sequences: seq_idx checked and set (rows made contiguous).
void set_seq_idx(Prepared& q, const std::optional<Tensor>& seq_idx) {
  if (!seq_idx.has_value()) return;
  const Tensor& s = *seq_idx;
  auto& p = q.p;
  SCAN_CHECK(s.scalar_type() == at::kInt, "selective_scan_cuda: seq_idx must be int32, got ", c10::toString(s.scalar_type()));
  SCAN_CHECK(s.dim() == 2 && s.size(0) == p.batch && s.size(1) == p.seqlen,
             "selective_scan_cuda: seq_idx must be (batch, seqlen) = (", p.batch, ", ", p.seqlen, "), got ", shape_of(s));
  SCAN_CHECK(s.device() == q.u.device(), "selective_scan_cuda: seq_idx must be on u's device ", q.u.device().str(),
             ", got ", s.device().str());
  q.seq_idx = last_contig(s);
  p.seq_idx = q.seq_idx.data_ptr<int>();
  p.si_b = q.seq_idx.stride(0);
}

// Per-sequence final states (nseq of them, or their gradients) need seq_idx and a single row.
void check_seq_last(const char* what, int64_t nseq, const ssm::ScanParams& p, bool has_seq_idx) {
  SCAN_CHECK(has_seq_idx && p.batch == 1 && nseq >= 1 && nseq <= std::max(p.seqlen, 1), "selective_scan_cuda: ", what,
             " (per-sequence final states) need seq_idx, batch 1 and 1 <= nseq <= seqlen; got nseq=", nseq, ", batch ",
             p.batch, ", seqlen ", p.seqlen, has_seq_idx ? "" : ", no seq_idx");
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

// Which instantiation the forward takes for these inputs and this plan, without launching it
// (tests and benchmarks): full, without bounds checks; d16, fwd2's dstate-16 one.
py::dict fwd_instantiation(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C,
                           const std::optional<Tensor>& D, const std::optional<Tensor>& z,
                           const std::optional<Tensor>& delta_bias, bool softplus, int64_t R, bool fwd_tp, int64_t cpb,
                           int64_t tp_cpb, int64_t nsplit, int64_t gseg, bool exact_softplus) {
  const c10::cuda::CUDAGuard guard(u.device());
  Prepared q = prepare(u, delta, A, B, C, D, z, delta_bias, softplus, R, exact_softplus);
  auto& p = q.p;
  set_fwd_plan(p, fwd_tp, cpb, tp_cpb, nsplit, gseg);
  py::dict d;
  d["full"] = p.fwd_tp ? ssm::fwd_tp_full(p) : ssm::fwd2_full(p);
  d["d16"] = !p.fwd_tp && ssm::fwd2_d16(p);
  return d;
}

std::vector<Tensor> fwd(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C,
                        const std::optional<Tensor>& D, const std::optional<Tensor>& z,
                        const std::optional<Tensor>& delta_bias, bool softplus, int64_t R, bool save_ckpt,
                        bool save_y, bool fwd_tp, int64_t cpb, int64_t tp_cpb, int64_t nsplit, int64_t gseg,
                        bool exact_softplus, bool poison, const std::optional<Tensor>& seq_idx, int64_t nseq) {
  const c10::cuda::CUDAGuard guard(u.device());
  Prepared q = prepare(u, delta, A, B, C, D, z, delta_bias, softplus, R, exact_softplus);
  auto& p = q.p;
  set_fwd_plan(p, fwd_tp, cpb, tp_cpb, nsplit, gseg);
  set_seq_idx(q, seq_idx);
  if (nseq != 0) check_seq_last("nseq", nseq, p, seq_idx.has_value());
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
  // every sequence's final state but the last, written where the next one starts
  Tensor seq_last;
  if (nseq > 0) {
    seq_last = new_out({nseq, p.dim, p.dstate}, f32, poison);
    p.seq_last = seq_last.data_ptr<float>();
    p.nseq = (int)nseq;
  }
  if (p.batch > 0 && p.dim > 0 && p.seqlen > 0)
    launch_fwd(p, u.scalar_type(), q.w_f32, c10::cuda::getCurrentCUDAStream().stream());
  else
    last.zero_();
  if (nseq > 0) {
    seq_last[nseq - 1].copy_(last[0]);
    last = seq_last;
  }
  return {out, last, ckpt, y};
}

std::vector<std::optional<Tensor>> bwd(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B,
                                       const Tensor& C, const std::optional<Tensor>& D,
                                       const std::optional<Tensor>& z, const std::optional<Tensor>& delta_bias,
                                       bool softplus, int64_t R, const Tensor& ckpt, const Tensor& dout_in,
                                       const std::optional<Tensor>& dlast_in, const std::optional<Tensor>& y_in,
                                       int64_t cpb, int64_t nsplit, int64_t gseg, bool exact_softplus, bool poison,
                                       const std::optional<Tensor>& seq_idx, const std::optional<Tensor>& dseq_last_in) {
  const c10::cuda::CUDAGuard guard(u.device());
  Prepared q = prepare(u, delta, A, B, C, D, z, delta_bias, softplus, R, exact_softplus);
  auto& p = q.p;
  set_seq_idx(q, seq_idx);
  Tensor dseq_last;
  if (dseq_last_in.has_value()) {
    const Tensor& t = *dseq_last_in;
    SCAN_CHECK(t.dim() == 3 && t.size(1) == p.dim && t.size(2) == p.dstate, "selective_scan_cuda: dseq_last must be ",
               "(nseq, dim, dstate) = (nseq, ", p.dim, ", ", p.dstate, "), got ", shape_of(t));
    check_seq_last("dseq_last", t.size(0), p, seq_idx.has_value());
    dseq_last = t.to(at::kFloat).contiguous();
    p.dseq_last = dseq_last.data_ptr<float>();
    p.nseq = (int)t.size(0);
  }
  check_cpb("cpb", cpb, 32, p);
  p.cpb = (int)cpb;
  const int P = p.dim / p.groups / p.cpb;
  set_split(p, nsplit, gseg);
  check_smem("the backward", ssm::scan_bwd2_smem_floats(p));
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
  m.doc() = "mamba_ssm selective scan CUDA kernels (forward, backward); plans from mamba_ssm.ops.selective_scan_plan";
  m.def("fwd", &fwd, "selective scan forward", py::arg("u"), py::arg("delta"), py::arg("A"), py::arg("B"), py::arg("C"),
        py::arg("D"), py::arg("z"), py::arg("delta_bias"), py::arg("softplus"), py::arg("R"), py::arg("save_ckpt"),
        py::arg("save_y"), py::arg("fwd_tp"), py::arg("cpb"), py::arg("tp_cpb"), py::arg("nsplit"), py::arg("gseg"),
        py::arg("exact_softplus"), py::arg("poison"), py::arg("seq_idx") = py::none(), py::arg("nseq") = 0);
  m.def("bwd", &bwd, "selective scan backward", py::arg("u"), py::arg("delta"), py::arg("A"), py::arg("B"),
        py::arg("C"), py::arg("D"), py::arg("z"), py::arg("delta_bias"), py::arg("softplus"), py::arg("R"),
        py::arg("ckpt"), py::arg("dout"), py::arg("dlast"), py::arg("y"), py::arg("cpb"), py::arg("nsplit"),
        py::arg("gseg"), py::arg("exact_softplus"), py::arg("poison"), py::arg("seq_idx") = py::none(),
        py::arg("dseq_last") = py::none());
  m.def("fwd_instantiation", &fwd_instantiation, "the forward's kernel instantiation for these inputs and plan (full, d16)",
        py::arg("u"), py::arg("delta"), py::arg("A"), py::arg("B"), py::arg("C"), py::arg("D"), py::arg("z"),
        py::arg("delta_bias"), py::arg("softplus"), py::arg("R"), py::arg("fwd_tp"), py::arg("cpb"), py::arg("tp_cpb"),
        py::arg("nsplit"), py::arg("gseg"), py::arg("exact_softplus"));
}
