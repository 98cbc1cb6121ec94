// Instantiations of the selective scan forward kernels for u/delta/z of type __nv_bfloat16.
#include "scan_fwd2.cuh"
#include "scan_fwd_tp.cuh"

namespace ssm {

void scan_fwd_bf16(ScanParams& p, bool w_f32, cudaStream_t stream) {
  if (p.fwd_tp) {
    if (w_f32) launch_scan_fwd_tp<__nv_bfloat16, float>(p, stream);
    else launch_scan_fwd_tp<__nv_bfloat16, __nv_bfloat16>(p, stream);
  } else {
    if (w_f32) launch_scan_fwd2<__nv_bfloat16, float>(p, stream);
    else launch_scan_fwd2<__nv_bfloat16, __nv_bfloat16>(p, stream);
  }
}

}  // namespace ssm
