// Instantiations of the selective scan backward kernels for u/delta/z of type float.
#include "scan_bwd2.cuh"

namespace ssm {

void scan_bwd_f32(ScanParams& p, bool w_f32, cudaStream_t stream) {
  if (w_f32) launch_scan_bwd2<float, float>(p, stream);
  else launch_scan_bwd2<float, float>(p, stream);
}

}  // namespace ssm
