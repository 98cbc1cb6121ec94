// Instantiations of the selective scan forward kernels for u/delta/z of type float.
#include "scan_fwd2.cuh"
#include "scan_fwd_tp.cuh"

namespace ssm {

void scan_fwd_f32(ScanParams& p, bool w_f32, cudaStream_t stream) {
  if (p.fwd_tp) {
    if (w_f32) launch_scan_fwd_tp<float, float>(p, stream);
    else launch_scan_fwd_tp<float, float>(p, stream);
  } else {
    if (w_f32) launch_scan_fwd2<float, float>(p, stream);
    else launch_scan_fwd2<float, float>(p, stream);
  }
}

}  // namespace ssm
