// kernels/csrc/grpo_loss_math.cuh compiled for the CPU, for tests/unit/test_grpo_loss_math.py.
// Usage: grpo_loss_host IN OUT. IN: int64 n, double eps_low, eps_high, float dual_clip, int32 kl_mode,
// then n mask bytes and n floats each of logp, old, ref, adv, tis. OUT: n floats each of pg, kl,
// ratio, g_pg, g_kl.
#include <cstdint>
#include <cstdio>
#include <vector>

#include "grpo_loss_math.cuh"

template <typename T>
static void read(FILE* f, T* dst, size_t count) {
  if (std::fread(dst, sizeof(T), count, f) != count) throw 1;
}

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  FILE* in = std::fopen(argv[1], "rb");
  if (in == nullptr) return 3;
  int64_t n = 0;
  r1mega::GrpoParams p{};
  read(in, &n, 1);
  double eps_low = 0.0, eps_high = 0.0;  // the clip bounds as bindings.cpp computes them
  read(in, &eps_low, 1);
  read(in, &eps_high, 1);
  p.clip_low = static_cast<float>(1.0 - eps_low);
  p.clip_high = static_cast<float>(1.0 + eps_high);
  read(in, &p.dual_clip, 1);
  int32_t kl_mode = 0;
  read(in, &kl_mode, 1);
  p.kl_mode = kl_mode;
  std::vector<uint8_t> mask(n);
  std::vector<float> logp(n), old_logp(n), ref_logp(n), adv(n), tis(n);
  read(in, mask.data(), n);
  for (auto* v : {&logp, &old_logp, &ref_logp, &adv, &tis}) read(in, v->data(), n);
  std::fclose(in);
  std::vector<float> out(5 * n);
  for (int64_t i = 0; i < n; ++i) {
    const r1mega::GrpoToken t = r1mega::grpo_token(mask[i] != 0, logp[i], old_logp[i], ref_logp[i], adv[i], tis[i], p);
    const float values[5] = {t.pg, t.kl, t.ratio, t.g_pg, t.g_kl};
    for (int k = 0; k < 5; ++k) out[k * n + i] = values[k];
  }
  FILE* f = std::fopen(argv[2], "wb");
  if (f == nullptr || std::fwrite(out.data(), sizeof(float), out.size(), f) != out.size()) return 4;
  std::fclose(f);
  return 0;
}
