// Instantiations of the selective scan backward kernels for u/delta/z of type __half.
#include "scan_bwd2.cuh"

namespace ssm {

void scan_bwd_f16(ScanParams& p, bool w_f32, cudaStream_t stream) {
  if (w_f32) launch_scan_bwd2<__half, float>(p, stream);
  else launch_scan_bwd2<__half, __half>(p, stream);
}

}  // namespace ssm
