// The vocabulary-wide half of the fused GRPO loss: per-row softmax statistics of vocab-parallel
// logits in one read (forward), and the gradient with respect to the logits written in place
// (backward: one read, one write). The per-token loss on top of them (ratio, clipping, KL,
// weights: [N]-sized vectors) stays in PyTorch (r1mega/ops/logprobs.py). Plain CUDA C++, no
// torch headers; bindings.cpp adapts tensors.
//
// Forward, per row of z = logits / T over this rank's vocab slice: m = max z, S = sum e^(z - m),
// B = sum (z - m) e^(z - m), and z at the target when the target lies in the slice. Threads keep
// online (m, S, B) triples and merge them; -inf logits contribute nothing, NaN propagates.
// Backward, per element: p = e^(z - lse), grad = (g_logp (onehot - p) - g_ent p (log p + H)) / T.
// Accumulation in fp32 for fp32 and bf16 logits.

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

namespace {

constexpr int kThreads = 512;

struct Stats {
  float m, s, b;  // max, sum e^(z - m), sum (z - m) e^(z - m)
};

__device__ __forceinline__ Stats merge(Stats x, Stats y) {
  const float m = fmaxf(x.m, y.m);
  if (m == -INFINITY) return {m, 0.f, 0.f};  // both empty; NaN is handled by the caller
  const float fx = x.m == -INFINITY ? 0.f : expf(x.m - m);
  const float fy = y.m == -INFINITY ? 0.f : expf(y.m - m);
  const float bx = x.m == -INFINITY ? 0.f : fx * (x.b + (x.m - m) * x.s);
  const float by = y.m == -INFINITY ? 0.f : fy * (y.b + (y.m - m) * y.s);
  return {m, fx * x.s + fy * y.s, bx + by};
}

__device__ __forceinline__ Stats push(Stats st, float z) {
  if (z == -INFINITY) return st;
  if (isnan(z)) return {NAN, NAN, NAN};
  if (z > st.m) {
    const float f = st.m == -INFINITY ? 0.f : expf(st.m - z);
    return {z, st.s * f + 1.f, f * (st.b + (st.m == -INFINITY ? 0.f : (st.m - z) * st.s))};
  }
  const float e = expf(z - st.m);
  return {st.m, st.s + e, st.b + (z - st.m) * e};
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

// One block per row.
template <typename T>
__global__ void partials_kernel(const T* __restrict__ logits, const int64_t* __restrict__ targets, int64_t vocab,
                                int64_t vocab_start, float inv_temp, float* __restrict__ m_out,
                                float* __restrict__ s_out, float* __restrict__ b_out, float* __restrict__ zy_out) {
  __shared__ Stats shared[kThreads];
  const T* row = logits + static_cast<int64_t>(blockIdx.x) * vocab;
  Stats st{-INFINITY, 0.f, 0.f};
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) st = push(st, to_float(row[j]) * inv_temp);
  shared[threadIdx.x] = st;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) {
      const Stats a = shared[threadIdx.x], c = shared[threadIdx.x + stride];
      shared[threadIdx.x] = (isnan(a.m) || isnan(c.m)) ? Stats{NAN, NAN, NAN} : merge(a, c);
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    m_out[blockIdx.x] = shared[0].m;
    s_out[blockIdx.x] = shared[0].s;
    b_out[blockIdx.x] = shared[0].b;
    const int64_t local = targets[blockIdx.x] - vocab_start;
    zy_out[blockIdx.x] = (local >= 0 && local < vocab) ? to_float(row[local]) * inv_temp : 0.f;
  }
}

// One block per row; overwrites the row's logits with their gradient. g_ent may be null (no entropy term).
template <typename T>
__global__ void backward_kernel(T* __restrict__ logits, const int64_t* __restrict__ targets, int64_t vocab,
                                int64_t vocab_start, float inv_temp, const float* __restrict__ lse,
                                const float* __restrict__ entropy, const float* __restrict__ g_logp,
                                const float* __restrict__ g_ent) {
  T* row = logits + static_cast<int64_t>(blockIdx.x) * vocab;
  const float l = lse[blockIdx.x];
  const float gl = g_logp != nullptr ? g_logp[blockIdx.x] : 0.f;
  const float ge = g_ent != nullptr ? g_ent[blockIdx.x] : 0.f;
  const float h = g_ent != nullptr ? entropy[blockIdx.x] : 0.f;
  const int64_t local = targets[blockIdx.x] - vocab_start;
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
    float logp = to_float(row[j]) * inv_temp - l;
    logp = logp < -3.0e38f ? -3.0e38f : logp;  // -inf logits: p = 0 and a finite log p; NaN stays NaN
    const float p = expf(logp);
    // p first: for -inf logits p = 0 must zero the term even when ge * (log p + H) overflows
    float grad = -(p * ge) * (logp + h) - p * gl;
    if (j == local) grad += gl;
    store(row + j, grad * inv_temp);
  }
}

}  // namespace

// dtype: 0 float32, 1 bfloat16.
extern "C" cudaError_t r1mega_logprob_partials(const void* logits, int dtype, const int64_t* targets, int64_t rows,
                                               int64_t vocab, int64_t vocab_start, float inv_temp, float* m, float* s,
                                               float* b, float* zy, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (dtype == 0) {
    partials_kernel<float><<<rows, kThreads, 0, stream>>>(static_cast<const float*>(logits), targets, vocab,
                                                          vocab_start, inv_temp, m, s, b, zy);
  } else {
    partials_kernel<__nv_bfloat16><<<rows, kThreads, 0, stream>>>(
        static_cast<const __nv_bfloat16*>(logits), targets, vocab, vocab_start, inv_temp, m, s, b, zy);
  }
  return cudaGetLastError();
}

extern "C" cudaError_t r1mega_logprob_backward_inplace(void* logits, int dtype, const int64_t* targets, int64_t rows,
                                                       int64_t vocab, int64_t vocab_start, float inv_temp,
                                                       const float* lse, const float* entropy, const float* g_logp,
                                                       const float* g_ent, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (dtype == 0) {
    backward_kernel<float><<<rows, kThreads, 0, stream>>>(static_cast<float*>(logits), targets, vocab, vocab_start,
                                                          inv_temp, lse, entropy, g_logp, g_ent);
  } else {
    backward_kernel<__nv_bfloat16><<<rows, kThreads, 0, stream>>>(static_cast<__nv_bfloat16*>(logits), targets,
                                                                  vocab, vocab_start, inv_temp, lse, entropy, g_logp,
                                                                  g_ent);
  }
  return cudaGetLastError();
}
