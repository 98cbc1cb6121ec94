// Instantiations of the selective scan fwd kernel for u/delta/z of type __half.
#include "scan_fwd.cuh"

namespace ssm {

void scan_fwd_f16(ScanParams& p, bool w_f32, cudaStream_t stream) {
  if (w_f32) launch_scan_fwd<__half, float>(p, stream);
  else launch_scan_fwd<__half, __half>(p, stream);
}

}  // namespace ssm
