// torch bindings of r1mega's CUDA kernels (built as the r1mega_kernels extension).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

extern "C" cudaError_t r1mega_group_advantage(const float* rewards, const int64_t* offsets, int num_groups, int mode,
                                              int sample_std, float eps, float* adv, cudaStream_t stream);

extern "C" cudaError_t r1mega_logprob_partials(const void* logits, int dtype, const int64_t* targets, int64_t rows,
                                               int64_t vocab, int64_t vocab_start, float inv_temp, float* m, float* s,
                                               float* b, float* zy, cudaStream_t stream);
extern "C" cudaError_t r1mega_logprob_backward_inplace(void* logits, int dtype, const int64_t* targets, int64_t rows,
                                                       int64_t vocab, int64_t vocab_start, float inv_temp,
                                                       const float* lse, const float* entropy, const float* g_logp,
                                                       const float* g_ent, cudaStream_t stream);

extern "C" cudaError_t r1mega_grpo_token_loss(int64_t n, const uint8_t* mask, const float* logp,
                                              const float* old_logp, const float* ref_logp, const float* adv,
                                              const float* tis, const float* weight, float clip_low, float clip_high,
                                              float dual_clip, int kl_mode, float beta, float* pg, float* kl,
                                              float* ratio, float* g_logp, cudaStream_t stream);

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
                                          c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "group_advantage kernel: ", cudaGetErrorString(err));
  return adv;
}

int logits_dtype(const torch::Tensor& logits) {
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 2 && logits.is_contiguous(), "logits must be contiguous CUDA [N, V]");
  TORCH_CHECK(logits.scalar_type() == torch::kFloat32 || logits.scalar_type() == torch::kBFloat16,
              "logits must be float32 or bfloat16, got ", logits.scalar_type());
  return logits.scalar_type() == torch::kFloat32 ? 0 : 1;
}

const float* optional_ptr(const torch::Tensor& t, const char* name, int64_t rows) {
  if (t.numel() == 0) return nullptr;
  check(t, name, torch::kFloat32);
  TORCH_CHECK(t.numel() == rows, name, " needs one value per row");
  return t.data_ptr<float>();
}

std::vector<torch::Tensor> logprob_partials(torch::Tensor logits, torch::Tensor targets, int64_t vocab_start,
                                            double inv_temp) {
  const int dtype = logits_dtype(logits);
  check(targets, "targets", torch::kInt64);
  TORCH_CHECK(targets.numel() == logits.size(0), "targets needs one id per row of logits");
  const c10::cuda::CUDAGuard guard(logits.device());
  auto opts = logits.options().dtype(torch::kFloat32);
  const int64_t rows = logits.size(0);
  auto m = torch::empty({rows}, opts), s = torch::empty({rows}, opts), b = torch::empty({rows}, opts),
       zy = torch::empty({rows}, opts);
  const auto err = r1mega_logprob_partials(logits.data_ptr(), dtype, targets.data_ptr<int64_t>(), rows, logits.size(1),
                                           vocab_start, static_cast<float>(inv_temp), m.data_ptr<float>(),
                                           s.data_ptr<float>(), b.data_ptr<float>(), zy.data_ptr<float>(),
                                           c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "logprob_partials kernel: ", cudaGetErrorString(err));
  return {m, s, b, zy};
}

void logprob_backward_(torch::Tensor logits, torch::Tensor targets, int64_t vocab_start, double inv_temp,
                       torch::Tensor lse, torch::Tensor entropy, torch::Tensor g_logp, torch::Tensor g_ent) {
  const int dtype = logits_dtype(logits);
  check(targets, "targets", torch::kInt64);
  check(lse, "lse", torch::kFloat32);
  const int64_t rows = logits.size(0);
  const float* ent = optional_ptr(entropy, "entropy", rows);
  const float* ge = optional_ptr(g_ent, "g_ent", rows);
  TORCH_CHECK(ge == nullptr || ent != nullptr, "g_ent needs the entropy");
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto err = r1mega_logprob_backward_inplace(logits.data_ptr(), dtype, targets.data_ptr<int64_t>(), rows,
                                                   logits.size(1), vocab_start, static_cast<float>(inv_temp),
                                                   lse.data_ptr<float>(), ent, optional_ptr(g_logp, "g_logp", rows),
                                                   ge, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "logprob_backward kernel: ", cudaGetErrorString(err));
}

// (pg, kl, ratio, g_logp) per token; ref_logp and tis may be empty (no KL / no TIS).
std::vector<torch::Tensor> grpo_token_loss(torch::Tensor mask, torch::Tensor logp, torch::Tensor old_logp,
                                           torch::Tensor ref_logp, torch::Tensor adv, torch::Tensor tis,
                                           torch::Tensor weight, double eps_low, double eps_high, double dual_clip,
                                           int64_t kl_mode, double beta) {
  TORCH_CHECK(mask.is_cuda() && mask.scalar_type() == torch::kBool && mask.is_contiguous() && mask.dim() == 1,
              "mask must be a contiguous 1-D CUDA bool tensor");
  const int64_t n = mask.numel();
  for (auto* t : {&logp, &old_logp, &adv, &weight}) {
    check(*t, "per-token input", torch::kFloat32);
    TORCH_CHECK(t->numel() == n, "every per-token input needs one value per token");
  }
  TORCH_CHECK(kl_mode >= 0 && kl_mode <= 3, "kl_mode must be 0 (off), 1, 2 or 3 (k1..k3), got ", kl_mode);
  TORCH_CHECK(kl_mode == 0 || ref_logp.numel() > 0, "a KL estimator needs reference log-probs");
  const c10::cuda::CUDAGuard guard(logp.device());
  auto pg = torch::empty_like(logp), kl = torch::empty_like(logp), ratio = torch::empty_like(logp),
       g_logp = torch::empty_like(logp);
  const auto err = r1mega_grpo_token_loss(
      n, reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>()), logp.data_ptr<float>(), old_logp.data_ptr<float>(),
      optional_ptr(ref_logp, "ref_logp", n), adv.data_ptr<float>(), optional_ptr(tis, "tis", n),
      weight.data_ptr<float>(), static_cast<float>(1.0 - eps_low), static_cast<float>(1.0 + eps_high),
      static_cast<float>(dual_clip), static_cast<int>(kl_mode), static_cast<float>(beta), pg.data_ptr<float>(),
      kl.data_ptr<float>(), ratio.data_ptr<float>(), g_logp.data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "grpo_token_loss kernel: ", cudaGetErrorString(err));
  return {pg, kl, ratio, g_logp};
}

}  // namespace

// An ahead-of-time build (setup.py) names the sources it was built from; r1mega.ops.kernels
// compares that with the sources on disk and rebuilds just in time when they differ.
#define R1MEGA_STR2(x) #x
#define R1MEGA_STR(x) R1MEGA_STR2(x)
#ifdef R1MEGA_SOURCES_DIGEST
#define R1MEGA_DIGEST_STRING R1MEGA_STR(R1MEGA_SOURCES_DIGEST)
#else
#define R1MEGA_DIGEST_STRING ""
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("sources_digest") = R1MEGA_DIGEST_STRING;
  m.def("group_advantage", &group_advantage, "per-group advantages of contiguous groups given by offsets");
  m.def("logprob_partials", &logprob_partials, "per-row max, sum-exp, entropy sum and target logit of a vocab slice");
  m.def("grpo_token_loss", &grpo_token_loss, "per-token surrogate, KL, ratio and d loss / d logp");
  m.def("logprob_backward_", &logprob_backward_, "gradient w.r.t. the logits, written into the logits");
}
