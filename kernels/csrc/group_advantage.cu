// Group-relative advantages over groups of variable size (contiguous rows given by offsets).
// Plain CUDA C++: no torch headers, so nvcc alone
// compiles it (r1mega's CI does, on machines without a GPU); bindings.cpp adapts torch tensors.
//
// Modes (r1mega.algorithms.advantages): 0 GRPO (r - mean) / (std + eps); 1 Dr. GRPO r - mean;
// 2 RLOO n / (n - 1) * (r - mean). std: sample (n - 1) or population (n). A group of one gets 0.
// Accumulation in double: a group's rewards are few, and mean-then-deviation (two passes) avoids
// the cancellation of E[r^2] - E[r]^2.

#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr int kThreads = 256;

__device__ double block_sum(double v, double* shared) {
  const int lane = threadIdx.x;
  shared[lane] = v;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (lane < stride) shared[lane] += shared[lane + stride];
    __syncthreads();
  }
  const double total = shared[0];
  __syncthreads();  // shared is reused by the next call
  return total;
}

// One block per group.
__global__ void group_advantage_kernel(const float* __restrict__ rewards, const int64_t* __restrict__ offsets,
                                       int mode, int sample_std, float eps, float* __restrict__ adv) {
  __shared__ double shared[kThreads];
  const int64_t begin = offsets[blockIdx.x];
  const int64_t end = offsets[blockIdx.x + 1];
  const int64_t n = end - begin;

  double s = 0.0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) s += rewards[i];
  const double mean = n > 0 ? block_sum(s, shared) / static_cast<double>(n) : 0.0;

  double scale = 1.0;
  if (mode == 0) {
    double q = 0.0;
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      const double d = rewards[i] - mean;
      q += d * d;
    }
    q = block_sum(q, shared);
    const int64_t dof = sample_std ? n - 1 : n;
    const double std = dof > 0 ? sqrt(q / static_cast<double>(dof)) : 0.0;
    const double denom = std + static_cast<double>(eps);
    scale = denom > 0.0 ? 1.0 / denom : 0.0;
  } else if (mode == 2) {
    scale = n > 1 ? static_cast<double>(n) / static_cast<double>(n - 1) : 0.0;
  }
  // a group of one has deviation 0, so advantage 0, in every mode
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    adv[i] = static_cast<float>((rewards[i] - mean) * scale);
  }
}

}  // namespace

extern "C" cudaError_t r1mega_group_advantage(const float* rewards, const int64_t* offsets, int num_groups, int mode,
                                              int sample_std, float eps, float* adv, cudaStream_t stream) {
  if (num_groups > 0) {
    group_advantage_kernel<<<num_groups, kThreads, 0, stream>>>(rewards, offsets, mode, sample_std, eps, adv);
  }
  return cudaGetLastError();
}
