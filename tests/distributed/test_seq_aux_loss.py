"""DeepSeek's sequence-wise load-balancing loss is per row of a THD pack, as it is per row of padded rows.

Oracle: megatron-core's own seq_aux_loss on one right-padded row per micro-batch, where its
[s, b] layout makes each sequence a row (b = 1), averaged over the rows' micro-batches. A pack of the
same rows (different lengths) must give the same gradients, from the loss alone; megatron's
pack-wide loss (the rows as one sequence) would not. At TP=1 and TP=2 with sequence parallelism.
"""

from __future__ import annotations

import pytest
import torch

from r1mega.platform.launch import spawn

pytestmark = pytest.mark.distributed

LENGTHS = (11, 5, 8)


def _grads(folder, tp, per_row_packs):
    from megatron.core import parallel_state as ps

    from rl_helpers import config
    from r1mega.models.builder import build_model
    from r1mega.platform.distributed import destroy, initialize
    from r1mega.trainer.forward_backward import run_schedule
    from r1mega.trainer.rl.batch import StepBatch, collate, pack

    # without the MTP layer: its loss (a per-micro-batch mean without a step's token weight) would differ
    # between one pack and one padded row per micro-batch, and this compares the balancing loss
    extra = ["model=tiny_dsv3", "model.num_query_groups=4", "model.moe.aux_loss_coeff=0.1",
             "model.moe.load_balancing_type=seq_aux_loss", "model.mtp=null"]
    if tp > 1:
        extra += ["parallel.tp=2", "parallel.sequence_parallel=true"]
    cfg = config(folder, extra, world_size=tp)
    initialize(cfg.parallel, seed=3)
    try:
        torch.manual_seed(0)
        chunks = build_model(cfg.model, cfg.parallel)
        g = torch.Generator().manual_seed(1)
        tokens = [torch.randint(0, cfg.model.vocab_size, (n,), generator=g) for n in LENGTHS]
        batch = StepBatch(tokens, [2] * len(tokens), torch.zeros(len(tokens)), [torch.zeros(n - 2) for n in LENGTHS])
        rows = list(range(len(tokens)))
        if per_row_packs == "pack":
            micro = [pack(batch, rows, multiple=2 * tp)]
        elif per_row_packs == "pack_wide":  # the pack as megatron would see it: one sequence
            import r1mega.trainer.forward_backward as fb

            micro = [pack(batch, rows, multiple=2 * tp)]
            fb._pack_rows = lambda m: None
        else:
            micro = [collate(batch, [r], multiple=tp) for r in rows]

        def aux_only(m, logits):
            return logits.sum() * 0.0, {}

        for c in chunks:
            c.zero_grad()
        run_schedule(chunks, micro, aux_only, forward_only=False)
        out = {}
        for name, p in chunks[0].named_parameters():
            grad = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            if tp > 1 and getattr(p, "sequence_parallel", False):
                torch.distributed.all_reduce(grad, group=ps.get_tensor_model_parallel_group())
            out[name] = grad
        return out
    finally:
        destroy()


@pytest.mark.parametrize("tp", [1, 2])
def test_pack_takes_the_loss_of_each_row(tmp_path, tp):
    ref = spawn(tp, _grads, str(tmp_path / "rows"), tp, "rows")
    got = spawn(tp, _grads, str(tmp_path / "pack"), tp, "pack")
    wide = spawn(tp, _grads, str(tmp_path / "wide"), tp, "pack_wide")
    for rank in range(tp):
        router = [n for n in ref[rank] if n.endswith("router.weight")]
        assert router and ref[rank][router[0]].abs().max() > 0  # the loss reaches the router
        for name, grad in ref[rank].items():  # float32 sums in another order: relative to the gradient's size
            error = (got[rank][name] - grad).abs().max() / grad.abs().max().clamp(min=1e-30)
            assert error < 1e-4, f"{name}: relative error {error:.2e}"
        # the whole pack as one sequence balances otherwise
        r = ref[rank][router[0]]
        assert (wide[rank][router[0]] - r).abs().max() > 1e-2 * r.abs().max()
