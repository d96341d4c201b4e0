"""The native rollout engine: batched KV-cache decoding with the trainer's own megatron model.

Runs in the trainer's processes on the trainer's parameters (no copy, nothing to sync).
Every rank of a replica group (TP x PP x CP) generates the same rows: pipeline stages pass
activations forward, the last stage samples, and the chosen tokens are broadcast back so
the first stage can embed them. Context-parallel ranks each run the whole sequences (the
model splits only THD packs) and take the first one's tokens, so they stay identical.
Prompts are left-padded; rotary embeddings are relative, so the shifted positions give the
same log-probs as the trainer's unpadded forward. Long-tailed prompt lengths would make that
padding most of the prefill, so prompts are prefilled in buckets of similar length, each
right-aligned in the one cache (`_prefill_buckets`).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.transformer.moe.moe_layer import BaseMoELayer
from megatron.core.transformer.utils import set_model_to_sequence_parallel

from r1mega.models.attention import SDPAttention
from r1mega.models.routing_replay import moe_layer_numbers, recording
from r1mega.rollout.routing_record import RoutingRecord
from r1mega.rollout.sampling import sample_next
from r1mega.rollout.types import Rollouts, SamplingParams

# Compact the KV cache once this share of rows has finished: fewer rows per decode step.
_COMPACT_BELOW = 0.75


class NativeEngine:
    """RolloutEngine over megatron GPTModel chunks (one per virtual pipeline stage)."""

    weights_lost = False  # it decodes with the trainer's parameters themselves

    def __init__(
        self,
        chunks: Sequence[torch.nn.Module],
        eos_token_ids: Sequence[int],
        pad_token_id: int,
        detokenize: Optional[Callable[[List[int]], str]] = None,
        max_batch_size: int = 512,
        seed: int = 0,
        row_multiple: int = 1,
    ):
        self.chunks = list(chunks)
        self.eos_token_ids = tuple(eos_token_ids)
        self.pad_token_id = pad_token_id
        self.detokenize = detokenize
        self.max_batch_size = max_batch_size
        self.seed = seed
        # decoding batches hold a multiple of this many rows (FP8: Transformer Engine's shape rule),
        # with copies of the first prompt, or finished rows, filling up
        self.row_multiple = row_multiple
        self._calls = 0
        # per generate() call: prefill positions read and how many were prompt tokens; with `timed`
        # set, also seconds in prefill and in the whole call (timing synchronizes the device, so the
        # trainer leaves it off and the rollout benchmark turns it on)
        self.timed = False
        self.last_stats: Dict[str, float] = {}
        # what one more prefill forward costs, in prompt positions (kernel launches and per-layer
        # overheads against the arithmetic of a position): a bucket of shorter prompts is split off
        # when it saves more padding than this
        self.prefill_call_positions = 256
        # the policy version of the weights the chunks hold (asynchronous rollout workers set it), recorded
        # with every sampled token; `between_tokens`, when set, runs between decode steps and may load new
        # weights (partial rollouts), returning True when it did: the KV cache of the tokens so far is
        # then kept as the old weights computed it, or, with recompute_after_update, computed again under
        # the new ones (one prefill over every cached position)
        self.version = 0
        self.between_tokens: Optional[Callable[[], bool]] = None
        self.recompute_after_update = False
        # `row_done`, when set, hears of each row as soon as it is finished, by its row index in the call's
        # Rollouts, its response tokens and its finish reason: scoring can start while the others decode
        self.row_done: Optional[Callable[[int, List[int], str], None]] = None
        # MoE routing replay (algorithm.routing_replay=rollout): the rows carry the experts their routers
        # chose for every fed token (rollout.routing_record); the routers need replay objects installed
        self.record_routing = False
        config = self.chunks[0].config
        self._hidden = config.hidden_size
        self._dtype = config.params_dtype
        self._lockstep = config.num_moe_experts is not None and ps.get_expert_model_parallel_world_size() > 1
        attention = [m for c in self.chunks for m in c.modules() if hasattr(m, "core_attention")]
        # prefill in length buckets (see _prefill_buckets); False: one left-padded prefill
        self.bucketed_prefill = not self._lockstep and all(isinstance(m.core_attention, SDPAttention)
                                                            for m in attention)

    def generate(self, prompts: List[List[int]], params: SamplingParams, n: int = 1) -> Rollouts:
        """n samples of each prompt; reproducible for a given params.seed (else engine seed + call)."""
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        rows = [list(p) for p in prompts for _ in range(n)]
        group_index = [i for i in range(len(prompts)) for _ in range(n)]
        # unseeded calls advance the engine's own stream (saved in checkpoints); seeded calls
        # (evaluation) leave it alone, so evaluating never changes the training rollouts
        seed = params.seed if params.seed is not None else self.stream_seed(self.seed, self._calls)
        self._calls += params.seed is None
        generator = torch.Generator(device=self._device()).manual_seed(seed)
        responses, logprobs, reasons, versions, routing = [], [], [], [], []
        self.last_stats = {"prefill_positions": 0, "prefill_tokens": 0, "prefill_s": 0.0}
        start_time = self._clock()
        per_call = max(1, self.max_batch_size // n)  # prompts per decoding batch (each gives n rows)
        multiple = self._prompt_multiple(n)
        if per_call >= multiple:  # padding a batch to the row multiple then stays within the budget
            per_call -= per_call % multiple
        with self._inference_mode():
            for start in self._batch_starts(len(prompts), per_call):
                r, lp, fr, v, rt = self._generate_batch(prompts[start:start + per_call], n, params, generator,
                                                        first_row=start * n)
                responses += r
                logprobs += lp
                reasons += fr
                versions += v
                routing += rt
        self.last_stats["generate_s"] = self._clock() - start_time
        return Rollouts(rows, responses, logprobs, reasons, group_index, versions, routing)

    @staticmethod
    def stream_seed(engine_seed: int, call: int) -> int:
        """The sampling seed of an engine's `call`-th unseeded generate call."""
        return engine_seed * 1_000_003 + call

    def state_dict(self) -> dict:
        """Position in the engine's own sampling stream (unseeded calls), for exact resumes."""
        return {"calls": self._calls}

    def load_state_dict(self, state: dict) -> None:
        self._calls = int(state.get("calls", 0))  # absent in a checkpoint of another engine

    def sync_weights(self, named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> None:
        """Nothing to do: the engine decodes with the trainer's parameters themselves."""

    def release_memory(self, tags: Sequence[str] = ()) -> None:
        """KV caches live only inside generate(); return cached blocks to the device."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def resume_memory(self, tags: Sequence[str] = ()) -> None:
        """Nothing was released beyond the allocator cache."""

    def shutdown(self) -> None:
        """Nothing runs outside the trainer's processes."""

    # -- batches -------------------------------------------------------------------------

    def _batch_starts(self, num_prompts: int, per_call: int) -> range:
        starts = range(0, num_prompts, per_call)
        if self._lockstep:  # MoE all-to-alls need the same number of forwards on every EP rank
            counts = torch.tensor([len(starts), -len(starts)], device=self._device())
            dist.all_reduce(counts, op=dist.ReduceOp.MAX, group=ps.get_data_parallel_group())
            if counts[0].item() != -counts[1].item():
                raise ValueError(f"expert-parallel generation needs as many decoding batches on every rank; this "
                                 f"rank has {len(starts)} ({num_prompts} prompts, {per_call} per batch)")
        return starts

    def _generate_batch(self, prompts, n: int, params: SamplingParams, generator, first_row: int = 0):
        """n samples of each prompt. The prompts are prefilled once; their KV cache and last logits
        are then copied to each prompt's n rows (prefix sharing, as serving engines do)."""
        device = self._device()
        real = len(prompts)  # prompts past these fill the batch up to row_multiple and are dropped
        prompts = list(prompts) + [prompts[0]] * (-len(prompts) % self._prompt_multiple(n))
        # longest first: the prefill runs in buckets of similar length, and the widest allocates the cache
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        prompts = [prompts[i] for i in order]
        self.last_stats["prefill_tokens"] += sum(len(p) for i, p in zip(order, prompts) if i < real)
        buckets = self._prefill_buckets([len(p) for p in prompts])
        width = buckets[0][1]
        pad = torch.tensor([width - len(r) for r in prompts], device=device)
        ctx = StaticInferenceContext(len(prompts), width + params.max_new_tokens)
        config = self.chunks[0].config
        record = RoutingRecord(len(prompts), len(moe_layer_numbers(config)), config.moe_router_topk) \
            if self.record_routing else None
        logits = self._prefill(prompts, buckets, pad, ctx, record)
        b = len(prompts) * n
        alive = torch.arange(b, device=device)  # original row of each cache row
        out_ids = [[] for _ in range(b)]
        out_lp = [[] for _ in range(b)]
        out_version = [[] for _ in range(b)]
        reasons = ["length"] * b
        done = [order[row // n] >= real for row in range(b)]
        # what each row's cache holds, for a recompute after a weight update: its prompt left-padded
        # to the cache width, then every token fed to it
        fed = [[self.pad_token_id] * (width - len(prompts[row // n])) + list(prompts[row // n]) for row in range(b)] \
            if self.recompute_after_update and self.between_tokens is not None else None
        if record is not None:
            record.start_rows(n)
        if n > 1:
            copies = torch.arange(len(prompts), device=device).repeat_interleave(n)
            logits = logits[copies] if logits is not None else None
            pad = pad[copies]
            _select_cache_rows(ctx, copies)
        # a cache row's index in the call's Rollouts (prompt order, n rows each), for row_done
        call_row = lambda row: first_row + order[row // n] * n + row % n  # noqa: E731
        for step in range(params.max_new_tokens):
            next_ids, next_lp = self._choose(logits, params, generator, len(alive))
            rows = alive.tolist()
            for row, token, lp in zip(rows, next_ids.tolist(), next_lp.tolist()):
                if done[row]:
                    continue
                out_ids[row].append(token)
                out_lp[row].append(lp)
                out_version[row].append(self.version)
                if self._stops(out_ids[row], params):
                    done[row] = True
                    reasons[row] = "stop"
                    if self.row_done is not None:
                        self.row_done(call_row(row), out_ids[row], "stop")
            if step == params.max_new_tokens - 1 or not self._any_active(done):
                break
            if self.between_tokens is not None and self.between_tokens() and fed is not None:
                self._recompute_cache(ctx, [fed[row] for row in rows], pad)
            keep = _keep_multiple([not done[row] for row in rows], self.row_multiple)
            if keep.sum() < _COMPACT_BELOW * len(rows):
                keep = keep.to(device)
                alive, next_ids, pad = alive[keep], next_ids[keep], pad[keep]
                _select_cache_rows(ctx, keep.nonzero().squeeze(1))
            offset = ctx.sequence_len_offset
            positions = (offset - pad)[:, None]
            mask = (torch.arange(offset + 1, device=device)[None] < pad[:, None])[:, None, None, :]
            recorded = {} if record is not None else None
            logits = self._forward(next_ids[:, None], positions, mask, ctx, recorded)
            if record is not None:
                record.decode(alive.tolist(), [not done[row] for row in alive.tolist()], recorded)
            ctx.sequence_len_offset += 1
            if fed is not None:
                for row, token in zip(alive.tolist(), next_ids.tolist()):
                    fed[row].append(token)
        if self.row_done is not None:  # the rows the length cap stopped
            for row in range(b):
                if order[row // n] < real and reasons[row] == "length":
                    self.row_done(call_row(row), out_ids[row], "length")
        # back to the caller's prompt order
        rank = {i: k for k, i in enumerate(order)}
        rows = [rank[i] * n + j for i in range(real) for j in range(n)]
        pick = lambda xs: [xs[r] for r in rows]  # noqa: E731
        routing = [record.row(r) for r in rows] if record is not None else []
        return pick(out_ids), pick(out_lp), pick(reasons), pick(out_version), routing

    def _prefill_buckets(self, lengths: List[int]) -> List[Tuple[int, int]]:
        """(rows, width) of each prefill forward over prompts sorted longest first, right-aligned in
        one cache of the first bucket's width. Left padding to the longest prompt can fill most of a
        prefill when prompt lengths are long-tailed; one forward per group of similar lengths removes
        it, at the price of a forward's fixed cost (`prefill_call_positions`). The groups minimise
        padded positions + that cost per forward (dynamic programming over the distinct lengths).

        A bucket starts at cache position width - its width, so its queries attend to keys before
        them: r1mega's SDPA and flash-attn modules mask that shape (bottom-right causal); other core
        attention modules, and expert-parallel MoE (whose all-to-alls need the same number of
        forwards on every rank), prefill in one bucket."""
        m = self.row_multiple  # FP8: every forward's rows x width must be a multiple of m
        whole = [(len(lengths), lengths[0] + -lengths[0] % (m // math.gcd(m, len(lengths))))]
        if not self.bucketed_prefill:
            return whole
        widths = [w + -w % m for w in lengths]  # any number of rows may share a bucket
        starts = [i for i in range(len(widths)) if i == 0 or widths[i] != widths[i - 1]] + [len(widths)]
        best = {len(widths): (0, None)}  # start -> (cost of prompts from there on, next bucket's start)
        for a in reversed(starts[:-1]):
            best[a] = min(((t - a) * widths[a] + self.prefill_call_positions + best[t][0], t)
                          for t in starts if t > a)
        buckets, a = [], 0
        while a < len(widths):
            t = best[a][1]
            buckets.append((t - a, widths[a]))
            a = t
        return buckets if len(buckets) > 1 else whole

    def _prefill(self, prompts: List[List[int]], buckets, pad: torch.Tensor, ctx,
                 record: Optional[RoutingRecord] = None) -> Optional[torch.Tensor]:
        """Last-position logits of every prompt (last stage; None elsewhere), filling the KV cache (and
        `record` with the prompts' routing)."""
        device, width = pad.device, buckets[0][1]
        started, outs, row = self._clock(), [], 0
        for rows, w in buckets:
            tokens = torch.full((rows, w), self.pad_token_id, dtype=torch.long, device=device)
            for i, r in enumerate(prompts[row:row + rows]):
                tokens[i, w - len(r):] = torch.tensor(r, dtype=torch.long)
            cache_pos = torch.arange(width - w, width, device=device)
            positions = (cache_pos[None] - pad[row:row + rows, None]).clamp(min=0)
            ctx.batch_size_offset, ctx.sequence_len_offset = row, width - w
            recorded = {} if record is not None else None
            outs.append(self._forward(tokens, positions, _prefill_mask(pad[row:row + rows], cache_pos, width), ctx,
                                      recorded))
            if record is not None:
                record.prefill(row, [len(r) for r in prompts[row:row + rows]], recorded)
            if row == 0 and len(buckets) > 1:
                # the cache is allocated uninitialised; the later buckets leave their rows' leading
                # positions unwritten, masked but multiplied by zero attention weights (0 x NaN = NaN)
                for k, v in ctx.key_value_memory_dict.values():
                    k[:, rows:].zero_()
                    v[:, rows:].zero_()
            self.last_stats["prefill_positions"] += rows * w
            row += rows
        ctx.batch_size_offset, ctx.sequence_len_offset = 0, width
        self.last_stats["prefill_s"] += self._clock() - started
        return torch.cat(outs) if outs[0] is not None else None

    def _recompute_cache(self, ctx, rows: List[List[int]], pad: torch.Tensor) -> None:
        """Every cached position of these rows (the cache's rows, in order) computed again under the
        weights the chunks hold now."""
        width = ctx.sequence_len_offset
        tokens = torch.tensor(rows, dtype=torch.long, device=pad.device)
        cache_pos = torch.arange(width, device=pad.device)
        positions = (cache_pos[None] - pad[:, None]).clamp(min=0)
        ctx.batch_size_offset, ctx.sequence_len_offset = 0, 0
        self._forward(tokens, positions, _prefill_mask(pad, cache_pos, width), ctx)
        ctx.sequence_len_offset = width

    def _prompt_multiple(self, n: int) -> int:
        """Prompts per decoding batch must be a multiple of this for its rows (x n) to be one of row_multiple."""
        return self.row_multiple // math.gcd(self.row_multiple, n)

    def _stops(self, ids: List[int], params: SamplingParams) -> bool:
        last = ids[-1]
        if last in self.eos_token_ids or last in params.stop_token_ids:
            return True
        if params.stop and self.detokenize is not None:
            tail = self.detokenize(ids[-(8 + max(len(s) for s in params.stop)):])
            return any(s in tail for s in params.stop)
        return False

    def _any_active(self, done: List[bool]) -> bool:
        active = torch.tensor(int(not all(done)), device=self._device())
        if self._lockstep:
            dist.all_reduce(active, op=dist.ReduceOp.MAX, group=ps.get_data_parallel_group())
        return bool(active.item())

    # -- model-parallel plumbing ---------------------------------------------------------

    def _forward(self, tokens, positions, mask, ctx, recorded: Optional[dict] = None) -> Optional[torch.Tensor]:
        """Logits [b, v] of the last position on the last stage; None on other stages. With `recorded`,
        also the experts this rank's routers chose: recorded[MoE layer] = [b, s, k]."""
        b, s = tokens.shape
        for chunk in self.chunks:
            if not chunk.pre_process:
                hidden = torch.empty(s, b, self._hidden, dtype=self._dtype, device=tokens.device)
                dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
                chunk.set_input_tensor(hidden)
            with recording(chunk, recorded, b) if recorded is not None else nullcontext():
                out = chunk(tokens, positions, mask, inference_context=ctx, runtime_gather_output=True)
            if not chunk.post_process:
                dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            else:
                return out[:, -1]
        return None

    def _choose(self, logits, params, generator, b: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Sample on the last stage, then share (ids, log-probs) with all of the replica group."""
        packed = torch.empty(2, b, dtype=torch.float64, device=self._device())
        if logits is not None and ps.get_tensor_model_parallel_rank() == 0:
            ids, lp = sample_next(logits, params, generator)
            packed[0], packed[1] = ids.double(), lp.double()
        elif logits is not None and not params.greedy:
            # keep every TP rank's generator in step with the sampling rank's
            sample_next(logits, params, generator)
        if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_world_size() > 1:
            dist.broadcast(packed, src=ps.get_tensor_model_parallel_src_rank(),
                           group=ps.get_tensor_model_parallel_group())
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(packed, src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
        if ps.get_context_parallel_world_size() > 1:
            group = ps.get_context_parallel_group()
            dist.broadcast(packed, src=dist.get_global_rank(group, 0), group=group)
        return packed[0].long(), packed[1].float()

    def _device(self) -> torch.device:
        return next(self.chunks[0].parameters()).device

    def _clock(self) -> float:
        if not self.timed:
            return 0.0
        if self._device().type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextmanager
    def _inference_mode(self):
        """Eval mode, no grad, and sequence parallelism off (a decode step has one token)."""
        modes = [c.training for c in self.chunks]
        sp = self.chunks[0].config.sequence_parallel
        exclude = [BaseMoELayer] if ps.get_tensor_model_parallel_world_size() > 1 else None
        for c in self.chunks:
            c.eval()
            if sp:
                set_model_to_sequence_parallel(c, False, exclude_modules=exclude)
        try:
            with torch.no_grad():
                yield
        finally:
            for c, mode in zip(self.chunks, modes):
                c.train(mode)
                if sp:
                    set_model_to_sequence_parallel(c, True, exclude_modules=exclude)
                c.set_input_tensor(None)


def _prefill_mask(pad: torch.Tensor, cache_pos: torch.Tensor, width: int) -> torch.Tensor:
    """[b, 1, q, k] for queries at cache positions `cache_pos` against keys [0, width) (the attention
    adds causality), True = masked: padding keys, except a pad query's own key (no empty rows)."""
    keys = torch.arange(width, device=pad.device)
    masked = (keys[None, None, :] < pad[:, None, None]) & (keys[None, None, :] != cache_pos[None, :, None])
    return masked[:, None]


def _keep_multiple(active: List[bool], multiple: int) -> torch.Tensor:
    """Rows to keep in the cache: the active ones, and as many finished ones as make their count a
    multiple of `multiple` (a finished row decodes on, unread). At least one row always stays."""
    keep = torch.tensor(active, dtype=torch.bool)
    short = -max(int(keep.sum()), 1) % multiple + (0 if keep.any() else 1)
    if short:
        keep[(~keep).nonzero().flatten()[:short]] = True
    return keep


def _select_cache_rows(ctx: StaticInferenceContext, rows: torch.Tensor) -> None:
    """Keep (or repeat) these rows of every layer's KV cache ([s, b, ...] buffers)."""
    for layer, (k, v) in ctx.key_value_memory_dict.items():
        ctx.key_value_memory_dict[layer] = (k[:, rows], v[:, rows])
