"""Target log-probs and entropy from vocab-parallel logits, without gathering the vocabulary.

Each tensor-parallel rank holds a contiguous vocab slice [vocab_start, vocab_start + V_local)
of the logits. Per chunk of rows: one all-reduce MAX of the row maxima m, then one all-reduce
SUM of the stacked (S = sum e^(z-m), B = sum (z-m) e^(z-m), z_y - m), giving
logp = (z_y - m) - log S and entropy = log S - B / S. Shifting by the global m before
exponentiating (rather than rescaling per-shard sums afterwards) keeps a shard whose logits
are all -inf from producing inf - inf.

Backward needs no collective: with lse = m + log S and p = softmax(z),
d logp / dz_j = onehot_j - p_j and d entropy / dz_j = -p_j (log p_j + entropy),
both scaled by 1/temperature, and each rank owns the gradient of its own slice.

Numerics: math runs in fp32 (fp64 for fp64 input) whatever the logits' dtype. -inf logits
(masked vocab padding) get probability 0, add 0 to the entropy and receive gradient 0; a
target on such an entry gets logp = -inf (with a finite gradient). NaN logits make that row's
outputs NaN; a row of only -inf logits gives NaN. Nothing is silently replaced.

Memory: rows go through in chunks; beyond the saved input logits a chunk needs one
[chunk, V_local] buffer for log-probs alone and two with entropy or in backward.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from r1mega.ops import logprobs_kernel
from r1mega.ops.kernels import agree, available

log = logging.getLogger(__name__)

DEFAULT_CHUNK_ROWS = 4096


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64 (gradient checks); everything else is accumulated in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scaled_copy(logits: torch.Tensor, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """A fresh compute-dtype copy of logits / temperature (the chunk's one working buffer)."""
    buf = logits.to(dtype, copy=True)
    return buf.div_(temperature) if temperature != 1.0 else buf


def _local_targets(targets: torch.Tensor, vocab_start: int, vocab_local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index into this slice, clamped to be valid; whether the target lies in this slice)."""
    local = targets - vocab_start
    inside = (local >= 0) & (local < vocab_local)
    return local.clamp(0, vocab_local - 1), inside


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_j a_ij b_ij per row, without materialising the product."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).reshape(-1)


def _forward_chunk(logits: torch.Tensor, targets: torch.Tensor, group, vocab_start: int,
                   temperature: float, with_entropy: bool, dtype: torch.dtype):
    """(logp, lse, entropy or None) of one chunk of rows."""
    z = _scaled_copy(logits, temperature, dtype)
    m = z.amax(-1)
    if group is not None:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    # -inf - (-inf) is NaN; a row whose global max is -inf has no distribution anyway.
    z.sub_(m.unsqueeze(-1))
    local, inside = _local_targets(targets, vocab_start, z.shape[-1])
    z_y = torch.where(inside, z.gather(-1, local.unsqueeze(-1)).squeeze(-1), 0.0)
    # Clamp -inf to the most negative finite value so (z - m) * e^(z - m) is 0 * finite, not NaN.
    z.clamp_(min=torch.finfo(dtype).min)
    if with_entropy:
        e = z.exp()
        stats = torch.stack([e.sum(-1), _row_dot(z, e), z_y])
        del e
    else:
        stats = torch.stack([z.exp_().sum(-1), z_y.new_zeros(z_y.shape), z_y])
    del z
    if group is not None:
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
    s, b, z_y = stats
    log_s = s.log()
    entropy = log_s - b / s if with_entropy else None
    return z_y - log_s, m + log_s, entropy


def _backward_chunk(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                    entropy: torch.Tensor | None, g_logp: torch.Tensor | None, g_ent: torch.Tensor | None,
                    vocab_start: int, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """Gradient w.r.t. one chunk of the local logits, in compute dtype."""
    logp = _scaled_copy(logits, temperature, dtype).sub_(lse.unsqueeze(-1))
    logp.clamp_(min=torch.finfo(dtype).min)  # keeps p * (log p + H) at 0 * finite for -inf logits
    p = logp.exp()
    grad = logp  # reuse the buffer: grad = -p * (g_ent * (log p + H) + g_logp) + g_logp * onehot
    if g_ent is not None:
        grad.add_(entropy.unsqueeze(-1)).mul_(p).mul_(g_ent.unsqueeze(-1))
    else:
        grad.zero_()
    if g_logp is not None:
        grad.addcmul_(p, g_logp.unsqueeze(-1))
        local, inside = _local_targets(targets, vocab_start, grad.shape[-1])
        hit = torch.where(inside, g_logp, 0.0).unsqueeze(-1)
        grad.neg_().scatter_add_(-1, local.unsqueeze(-1), hit)
    else:
        grad.neg_()
    return grad.div_(temperature) if temperature != 1.0 else grad


class _VocabParallelLogprobs(torch.autograd.Function):
    """logp [N] and entropy [N] (empty when not requested) of vocab-parallel logits [N, V_local]:
    the chunked PyTorch reference, or with `kernel` the CUDA kernels (r1mega/ops/logprobs_kernel.py)."""

    @staticmethod
    def forward(ctx, logits, targets, group, vocab_start, temperature, with_entropy, chunk_rows, kernel=False):
        if kernel:
            dtype = torch.float32
            logp, lse, entropy = logprobs_kernel.forward(logits, targets, group, vocab_start, temperature)
            entropy = entropy if with_entropy else logp.new_empty(0)
        else:
            dtype = _compute_dtype(logits.dtype)
            logp = logits.new_empty(logits.shape[0], dtype=dtype)
            lse = torch.empty_like(logp)
            entropy = torch.empty_like(logp) if with_entropy else logp.new_empty(0)
            for start in range(0, logits.shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                lp, ls, ent = _forward_chunk(logits[rows], targets[rows], group, vocab_start,
                                             temperature, with_entropy, dtype)
                logp[rows], lse[rows] = lp, ls
                if with_entropy:
                    entropy[rows] = ent
        ctx.save_for_backward(logits, targets, lse, entropy)
        ctx.config = (vocab_start, temperature, with_entropy, chunk_rows, dtype, kernel)
        ctx.set_materialize_grads(False)
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp, g_ent):
        logits, targets, lse, entropy = ctx.saved_tensors
        vocab_start, temperature, with_entropy, chunk_rows, dtype, kernel = ctx.config
        g_ent = g_ent if with_entropy else None
        if g_logp is None and g_ent is None:
            return (None,) * 8
        if kernel:
            grad = logprobs_kernel.backward_(logits, targets, lse, entropy, g_logp, g_ent, vocab_start, temperature)
            return grad, None, None, None, None, None, None, None
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            grad[rows] = _backward_chunk(
                logits[rows], targets[rows], lse[rows], entropy[rows] if with_entropy else None,
                None if g_logp is None else g_logp[rows].to(dtype), None if g_ent is None else g_ent[rows].to(dtype),
                vocab_start, temperature, dtype)
        return grad, None, None, None, None, None, None, None


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, tp_group=None, vocab_start: int = 0,
                   temperature: float = 1.0, with_entropy: bool = False,
                   chunk_rows: int = DEFAULT_CHUNK_ROWS) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(logits / temperature) at targets, and optionally the entropy, from a vocab slice.

    logits [..., V_local] hold vocab entries [vocab_start, vocab_start + V_local) of every row;
    targets [...] are global vocab ids. Returns fp32 (fp64 for fp64 input) tensors shaped like
    targets. tp_group None or of size 1 means the slice is the whole vocabulary.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if tp_group is not None and dist.get_world_size(tp_group) == 1:
        tp_group = None
    lead = targets.shape
    flat_logits, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    kernel = _kernel_runs(flat_logits, tp_group)
    if kernel:  # the kernels read rows whole and write the gradient into the logits
        flat_logits, flat_targets = flat_logits.contiguous(), flat_targets.contiguous()
    logp, entropy = _VocabParallelLogprobs.apply(flat_logits, flat_targets, tp_group, vocab_start, float(temperature),
                                                 with_entropy, max(1, chunk_rows), kernel)
    return logp.reshape(lead), entropy.reshape(lead) if with_entropy else None


_AGREED: dict = {}  # (tensor-parallel group, dtype) -> the path the whole group takes


def _kernel_runs(logits: torch.Tensor, group) -> bool:
    """The CUDA kernels take fp32 and bf16 logits on a GPU, when built and checked (fp64 stays on
    the reference). The kernel path issues other collectives than the reference's chunks, so the
    tensor-parallel group agrees once (per dtype) on which path all of it takes."""
    if group is None:
        return _kernel_usable(logits)
    key = (group, logits.dtype)
    if key not in _AGREED:
        _AGREED[key] = agree(_kernel_usable(logits), group)
    return _AGREED[key]


def _kernel_usable(logits: torch.Tensor) -> bool:
    """This rank's side of the agreement; an error (a build or check that cannot run here) counts as
    no, so every rank of the group still reaches the all-reduce."""
    try:
        return (logits.dtype in (torch.float32, torch.bfloat16) and available(logits)
                and logprobs_kernel.checked(logits.dtype, logits.device, _pytorch_path))
    except Exception as err:  # noqa: BLE001 - any failure means the reference path, on every rank
        log.error("r1mega log-prob kernels unusable here (%s: %s): the PyTorch reference runs instead",
                  type(err).__name__, err)
        return False




def _pytorch_path(logits: torch.Tensor, targets: torch.Tensor, temperature: float):
    """The chunked PyTorch definition on a whole vocabulary: the kernels' oracle."""
    return _VocabParallelLogprobs.apply(logits, targets, None, 0, temperature, True, DEFAULT_CHUNK_ROWS)


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                    with_entropy: bool = False):
    """Log-probs [b, L] of `targets` (and the entropy) from this tensor-parallel rank's vocab slice of
    the logits (megatron's layout: rank r holds entries [r * V_local, (r + 1) * V_local))."""
    tp_group = ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None
    vocab_start = ps.get_tensor_model_parallel_rank() * logits.size(-1)
    return token_logprobs(logits, targets, tp_group, vocab_start, temperature, with_entropy)


# -- several candidate tokens per position (on-policy distillation over a teacher's top-k) --------------------

def _tp() -> tuple:
    group = ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None
    return group, ps.get_tensor_model_parallel_rank()


def _logsumexp(z: torch.Tensor, group) -> torch.Tensor:
    """log sum exp over the whole vocabulary of this rank's slice z [..., V_local], differentiable: the shift is a
    constant, the sum an all-reduce whose gradient each rank keeps for its own slice (megatron's
    reduce_from_tensor_model_parallel_region). -inf where every entry is -inf."""
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

    m = z.detach().amax(dim=-1, keepdim=True)
    if group is not None:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = (z - m).exp().sum(dim=-1, keepdim=True)
    if group is not None:
        s = reduce_from_tensor_model_parallel_region(s, group=group)
    return m + s.log()


def _at(z: torch.Tensor, ids: torch.Tensor, vocab_start: int, group) -> torch.Tensor:
    """z at global vocab ids [..., k] from this rank's slice (0 where another rank holds the id), summed over ranks."""
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

    local = ids - vocab_start
    held = (local >= 0) & (local < z.size(-1))
    out = torch.where(held, z.gather(-1, local.clamp(0, z.size(-1) - 1)), torch.zeros((), dtype=z.dtype))
    return reduce_from_tensor_model_parallel_region(out, group=group) if group is not None else out


def _without(z: torch.Tensor, ids: torch.Tensor, vocab_start: int) -> torch.Tensor:
    """z with the entries of global ids [..., k] set to -inf (this rank's slice)."""
    size = z.size(-1)
    local = ids - vocab_start
    local = torch.where((local >= 0) & (local < size), local, size)  # another rank's: a spare column
    hit = torch.zeros(*z.shape[:-1], size + 1, dtype=torch.bool, device=z.device)
    hit.scatter_(-1, local, True)
    return z.masked_fill(hit[..., :size], float("-inf"))


def candidate_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[..., k + 1]: log softmax(logits / temperature) over the whole vocabulary at `ids` [..., k] (global ids),
    then the log of the mass of every other token (summed where it lies, not as 1 minus the rest: exact when
    the candidates hold nearly all of it). From this tensor-parallel rank's vocab slice; differentiable
    (plain autograd: [..., V_local] buffers per input). fp32 (fp64 for fp64 input), as token_logprobs; -inf
    at ids past the vocabulary."""
    group, tp_rank = _tp()
    z = logits.to(_compute_dtype(logits.dtype)) / temperature
    start = tp_rank * logits.size(-1)
    lse = _logsumexp(z, group)
    out = _at(z, ids, start, group) - lse
    vocab = logits.size(-1) * (dist.get_world_size(group) if group is not None else 1)
    out = torch.where(ids < vocab, out, torch.full((), float("-inf"), dtype=out.dtype))  # no such token here
    return torch.cat([out, _logsumexp(_without(z, ids, start), group) - lse], dim=-1)


def top_logprobs(logits: torch.Tensor, k: int, below: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs [..., k + 1], ids [..., k]) of the k most likely tokens at each position (temperature 1), most
    likely first, and last the log of all other tokens' mass (as candidate_logprobs), from this rank's vocab
    slice: each rank's own k best, gathered, then the k best of those. With `below`, only ids under it are
    candidates (another model's vocabulary: the rows past a tokenizer's tokens that padding adds to the
    embedding), though the log-probs are of the whole distribution."""
    group, tp_rank = _tp()
    with torch.no_grad():
        z = logits.to(_compute_dtype(logits.dtype))
        lse = _logsumexp(z, group)
        start = tp_rank * z.size(-1)
        eligible = z
        if below is not None and start + z.size(-1) > below:
            eligible = z.clone()
            eligible[..., max(below - start, 0):] = float("-inf")
        values, ids = eligible.topk(min(k, z.size(-1)), dim=-1)
        ids = ids + start
        if group is not None:
            size = dist.get_world_size(group)
            every_v = [torch.empty_like(values) for _ in range(size)]
            every_i = [torch.empty_like(ids) for _ in range(size)]
            dist.all_gather(every_v, values.contiguous(), group=group)
            dist.all_gather(every_i, ids.contiguous(), group=group)
            values, ids = torch.cat(every_v, dim=-1), torch.cat(every_i, dim=-1)
        best, where = values.topk(k, dim=-1)
        ids = ids.gather(-1, where)
        rest = _logsumexp(_without(z, ids, start), group) - lse
        return torch.cat([best - lse, rest], dim=-1), ids
