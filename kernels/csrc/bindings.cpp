// torch bindings of r1mega's CUDA kernels (built as the r1mega_kernels extension).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

extern "C" cudaError_t r1mega_group_advantage(const float* rewards, const int64_t* offsets, int num_groups, int mode,
                                              int sample_std, float eps, float* adv, cudaStream_t stream);
extern "C" cudaError_t r1mega_broadcast_to_tokens(const float* adv, const int64_t* token_offsets, int num_seqs,
                                                  float* out, cudaStream_t stream);

namespace {

void check(const torch::Tensor& t, const char* name, torch::ScalarType dtype) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous() && t.dim() == 1, name, " must be contiguous and 1-D");
}

torch::Tensor group_advantage(torch::Tensor rewards, torch::Tensor offsets, int64_t mode, bool sample_std,
                              double eps) {
  check(rewards, "rewards", torch::kFloat32);
  check(offsets, "offsets", torch::kInt64);
  TORCH_CHECK(mode >= 0 && mode <= 2, "mode must be 0 (grpo), 1 (drgrpo) or 2 (rloo), got ", mode);
  const c10::cuda::CUDAGuard guard(rewards.device());
  auto adv = torch::empty_like(rewards);
  const auto err = r1mega_group_advantage(rewards.data_ptr<float>(), offsets.data_ptr<int64_t>(),
                                          static_cast<int>(offsets.numel() - 1), static_cast<int>(mode), sample_std,
                                          static_cast<float>(eps), adv.data_ptr<float>(),
                                          at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "group_advantage kernel: ", cudaGetErrorString(err));
  return adv;
}

torch::Tensor broadcast_to_tokens(torch::Tensor adv, torch::Tensor token_offsets, int64_t num_tokens) {
  check(adv, "adv", torch::kFloat32);
  check(token_offsets, "token_offsets", torch::kInt64);
  TORCH_CHECK(token_offsets.numel() == adv.numel() + 1, "token_offsets needs one more entry than adv");
  const c10::cuda::CUDAGuard guard(adv.device());
  auto out = torch::zeros({num_tokens}, adv.options());
  const auto err = r1mega_broadcast_to_tokens(adv.data_ptr<float>(), token_offsets.data_ptr<int64_t>(),
                                              static_cast<int>(adv.numel()), out.data_ptr<float>(),
                                              at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "broadcast_to_tokens kernel: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("group_advantage", &group_advantage, "per-group advantages of contiguous groups given by offsets");
  m.def("broadcast_to_tokens", &broadcast_to_tokens, "each sequence's advantage onto its packed tokens");
}
