// Instantiations of the selective scan forward kernels for u/delta/z of type __half.
#include "scan_fwd2.cuh"
#include "scan_fwd_tp.cuh"

namespace ssm {

void scan_fwd_f16(ScanParams& p, bool w_f32, cudaStream_t stream) {
  if (p.fwd_tp) {
    if (w_f32) launch_scan_fwd_tp<__half, float>(p, stream);
    else launch_scan_fwd_tp<__half, __half>(p, stream);
  } else {
    if (w_f32) launch_scan_fwd2<__half, float>(p, stream);
    else launch_scan_fwd2<__half, __half>(p, stream);
  }
}

}  // namespace ssm
