// Instantiations of the selective scan backward kernels for u/delta/z of type __nv_bfloat16.
#include "scan_bwd2.cuh"

namespace ssm {

void scan_bwd_bf16(ScanParams& p, bool w_f32, cudaStream_t stream) {
  if (w_f32) launch_scan_bwd2<__nv_bfloat16, float>(p, stream);
  else launch_scan_bwd2<__nv_bfloat16, __nv_bfloat16>(p, stream);
}

}  // namespace ssm
