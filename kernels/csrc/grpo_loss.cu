// The per-token half of the GRPO-family loss in one launch (the math in grpo_loss_math.cuh):
// for N tokens, the surrogate and KL values for the loss and its statistics, and the gradient
// of the weighted loss with respect to each token's log-prob,
//   g_logp = w * (d pg / d logp + beta * d kl / d logp),
// where w is the token's aggregation weight (token-mean, sequence-mean, ... over the whole
// minibatch; 0 off the mask). The vocab-wide backward (grpo_logprobs.cu) turns g_logp into the
// gradient w.r.t. the logits. Plain CUDA C++; bindings.cpp adapts torch tensors.

#include <cuda_runtime.h>
#include <stdint.h>

#include "grpo_loss_math.cuh"

namespace {

constexpr int kThreads = 256;

__global__ void grpo_token_loss_kernel(int64_t n, const uint8_t* __restrict__ mask, const float* __restrict__ logp,
                                       const float* __restrict__ old_logp, const float* __restrict__ ref_logp,
                                       const float* __restrict__ adv, const float* __restrict__ tis,
                                       const float* __restrict__ weight, r1mega::GrpoParams params, float beta,
                                       float* __restrict__ pg, float* __restrict__ kl, float* __restrict__ ratio,
                                       float* __restrict__ g_logp) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const bool on = mask[i] != 0;
    // off the mask nothing is read but the mask (padding may hold anything)
    const r1mega::GrpoToken t =
        r1mega::grpo_token(on, on ? logp[i] : 0.0f, on ? old_logp[i] : 0.0f,
                           on && ref_logp != nullptr ? ref_logp[i] : 0.0f, on ? adv[i] : 0.0f,
                           on && tis != nullptr ? tis[i] : 1.0f, params);
    pg[i] = t.pg;
    kl[i] = t.kl;
    ratio[i] = t.ratio;
    g_logp[i] = on ? weight[i] * (t.g_pg + beta * t.g_kl) : 0.0f;
  }
}

}  // namespace

extern "C" cudaError_t r1mega_grpo_token_loss(int64_t n, const uint8_t* mask, const float* logp,
                                              const float* old_logp, const float* ref_logp, const float* adv,
                                              const float* tis, const float* weight, float clip_low, float clip_high,
                                              float dual_clip, int kl_mode, float beta, float* pg, float* kl,
                                              float* ratio, float* g_logp, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (kl_mode < r1mega::kNoKL || kl_mode > r1mega::kKL3 || (kl_mode != r1mega::kNoKL && ref_logp == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const r1mega::GrpoParams params{clip_low, clip_high, dual_clip, kl_mode};
  const int64_t blocks64 = (n + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(blocks64 < 65535 ? blocks64 : 65535);  // grid-stride beyond
  grpo_token_loss_kernel<<<blocks, kThreads, 0, stream>>>(n, mask, logp, old_logp, ref_logp, adv, tis, weight, params,
                                                          beta, pg, kl, ratio, g_logp);
  return cudaGetLastError();
}
