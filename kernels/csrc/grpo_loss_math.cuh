// The per-token half of the GRPO-family loss, given the token's log-prob (from the vocab pass of
// grpo_logprobs.cu): the ratio against the old policy, the clipped surrogate (clip-higher,
// optional dual clip), the truncated-IS weight, the KL estimate against the reference policy,
// and the derivative of all of it with respect to the log-prob.
//
// The same function runs in the CUDA kernel (grpo_loss.cu) and, compiled as plain C++ by the
// CPU tests, against the PyTorch definitions it follows term by term:
// r1mega.algorithms.policy_loss.clipped_surrogate (token ratios) and r1mega.algorithms.kl.
// Gradients follow autograd's conventions there: clamp passes the gradient at its bounds,
// maximum/minimum split it in half on ties.
#pragma once

#ifndef __CUDACC__
#include <cmath>
#define R1MEGA_HD inline
#define R1MEGA_EXP std::exp
#else
#define R1MEGA_HD __host__ __device__ inline
#define R1MEGA_EXP expf
#endif

namespace r1mega {

constexpr float kLogRatioBound = 20.0f;  // policy_loss.LOG_RATIO_BOUND and kl.K3_LOG_RATIO_BOUND

enum KLMode { kNoKL = 0, kKL1 = 1, kKL2 = 2, kKL3 = 3 };

struct GrpoParams {
  // the clip range [1 - eps_low, 1 + eps_high], computed in double and rounded once, as
  // PyTorch's clamp rounds its Python-float bounds
  float clip_low, clip_high;
  float dual_clip;  // 0: off, else c > 1
  int kl_mode;      // KLMode; kNoKL leaves kl and its gradient 0 (no reference log-probs read)
};

struct GrpoToken {
  float pg;      // surrogate loss times the TIS weight (0 off the mask)
  float kl;      // KL estimate (0 off the mask)
  float ratio;   // pi / pi_old (1 off the mask)
  float g_pg;    // d pg / d logp
  float g_kl;    // d kl / d logp
};

// d max(a, b) / d a, as autograd splits it
R1MEGA_HD float pick_first(float a, float b) { return a > b ? 1.0f : (a == b ? 0.5f : 0.0f); }

R1MEGA_HD float clamp_to(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }

R1MEGA_HD float inside(float x, float lo, float hi) { return (x >= lo && x <= hi) ? 1.0f : 0.0f; }

// One token. tis: the detached truncated-IS weight (1 when off). Off the mask every output is
// exactly 0 (ratio 1) whatever the inputs hold there (padding may be inf or NaN).
R1MEGA_HD GrpoToken grpo_token(bool on, float logp, float old_logp, float ref_logp, float adv, float tis,
                               const GrpoParams& p) {
  GrpoToken t{0.0f, 0.0f, 1.0f, 0.0f, 0.0f};
  if (!on) return t;
  // ratio = exp(clamp(logp - old, +-20)); d ratio / d logp = ratio while the clamp passes
  const float log_ratio = logp - old_logp;
  const float ratio = R1MEGA_EXP(clamp_to(log_ratio, -kLogRatioBound, kLogRatioBound));
  const float g_ratio = ratio * inside(log_ratio, -kLogRatioBound, kLogRatioBound);
  const float lo = p.clip_low, hi = p.clip_high;
  const float clipped = clamp_to(ratio, lo, hi);
  const float plain = -adv * ratio, capped = -adv * clipped;
  float pg = plain > capped ? plain : capped;
  float g = pick_first(plain, capped) * (-adv * g_ratio) +
            pick_first(capped, plain) * (-adv * g_ratio * inside(ratio, lo, hi));
  if (p.dual_clip > 0.0f && adv < 0.0f) {  // min(pg, -c A)
    const float cap = -adv * p.dual_clip;
    g *= pick_first(cap, pg);  // d min(pg, cap) / d pg = d max(-pg, -cap) / d(-pg)
    pg = pg < cap ? pg : cap;
  }
  t.pg = pg * tis;
  t.g_pg = g * tis;
  t.ratio = ratio;
  // KL(pi || ref) from d = logp - ref: k1 = d, k2 = d^2 / 2, k3 = e^l - l - 1 with l = clamp(-d, +-20)
  if (p.kl_mode == kNoKL) return t;
  const float d = logp - ref_logp;
  if (p.kl_mode == kKL1) {
    t.kl = d;
    t.g_kl = 1.0f;
  } else if (p.kl_mode == kKL2) {
    t.kl = 0.5f * d * d;
    t.g_kl = d;
  } else {
    const float l = clamp_to(-d, -kLogRatioBound, kLogRatioBound);
    const float e = R1MEGA_EXP(l);
    t.kl = e - l - 1.0f;
    t.g_kl = -(e - 1.0f) * inside(-d, -kLogRatioBound, kLogRatioBound);
  }
  return t;
}

}  // namespace r1mega
