"""Multi-token prediction (DeepSeek-V3's MTP), trained beside the model's next-token objective.

megatron-core builds the layers: a MultiTokenPredictionBlock after the decoder on the last pipeline
stage, sharing the embedding and output layer (a copy of the embedding when that stage is not the
first). Depth k combines the previous depth's hidden state at position i with the embedding of token
i + k and predicts token i + k + 1.

What GPTModel._postprocess does with them differs by version and fits neither RL nor generation:
megatron-core 0.16 requires labels and then returns the loss instead of logits; 0.17+ derives the
labels from the input when none are given. MTPGPTModel runs the block itself, only in training
forwards (below), and then leaves the output layer to GPTModel as for a model without MTP: every
forward returns the main logits, and generation and log-prob passes never run the MTP layers.

A training step opens `predicting_further(model, targets, mask, token_weight)` around its forward: each
input position's next token and whether a loss reads it. The next tokens cannot be derived from the
input (the last input position's target is not in it, nor a right-padded row's last). At depth k,
position i predicts targets[i + k] where mask[i + k] (shifted within each row of a THD pack). The loss
is loss_scale / depths times the cross-entropy summed over those positions and weighted as the step's
own loss weights a token (`token_weight`: RL and SFT divide by the step's global token count, as
DeepSeek-V3 divides each depth's sum by the sequence length), or without a weight averaged per
micro-batch, megatron's own choice (pre-training, whose loss megatron averages the same way). It reaches
backward through megatron's MTPLossAutoScaler, whose scale the pipeline schedule sets per micro-batch.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec
from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler, roll_tensor
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group
from megatron.core.utils import get_model_config, unwrap_model

from r1mega.models.norm import RMSNorm
from r1mega.platform.distributed import reduce_last_stage


def mtp_block_spec(config, decoder_spec, backend: str, pp_rank: Optional[int], vp_stage: Optional[int]):
    """megatron's MTP block spec on the stage that holds it (None elsewhere): each layer wraps the
    decoder's last layer spec; off Transformer Engine, r1mega's RMSNorm as in the decoder."""
    spec = get_gpt_mtp_block_spec(config, decoder_spec, use_transformer_engine=backend == "te",
                                  vp_stage=vp_stage, pp_rank=pp_rank)
    if spec is not None and backend != "te":
        for layer in spec.layer_specs:
            sub = layer.submodules
            sub.enorm, sub.hnorm, sub.layer_norm = RMSNorm, RMSNorm, RMSNorm
    return spec


class MTPGPTModel(GPTModel):
    """GPTModel whose MTP layers run only in training forwards that ask for them (see the module doc)."""

    _targets: Optional[tuple] = None  # (next tokens, mask [b, s], token weight) while predicting_further is open

    # RL sets this: the MTP loss then reaches the MTP layers only (the decoder's hidden states, the
    # embedding and the output layer enter it detached), so no policy weight gets a gradient from it
    # (the optimizer's global grad-norm clip still counts the MTP layers' gradients)
    detach_trunk: bool = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mtp_losses: List[torch.Tensor] = []  # per forward that ran the MTP layers: [depths] detached

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        # megatron-core 0.16 reads metadata["dp_cp_group"] to tie the MTP stage's embedding copy (pipeline
        # parallelism) without filling it in first, as its modules do for themselves
        return super().sharded_state_dict(prefix, sharded_offsets, ensure_metadata_has_dp_cp_group(metadata))

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, rotary_pos_emb, rotary_pos_cos,
                     rotary_pos_sin, mtp_in_postprocess=None, loss_mask=None, **rest):
        if mtp_in_postprocess and self._targets is not None:
            hidden_states = self._with_mtp_loss(hidden_states, input_ids, position_ids, rotary_pos_emb,
                                                rotary_pos_cos, rotary_pos_sin, rest)
        # GPTModel's own MTP step keys on config.mtp_num_layers; the config is shared with the MTP layers
        # (which read it), so it is hidden only for this call, which runs the output layer alone
        depths, self.config.mtp_num_layers = self.config.mtp_num_layers, None
        try:
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, rotary_pos_emb,
                                        rotary_pos_cos, rotary_pos_sin, mtp_in_postprocess=False,
                                        loss_mask=loss_mask, **rest)
        finally:
            self.config.mtp_num_layers = depths

    def _with_mtp_loss(self, hidden, input_ids, position_ids, rotary_pos_emb, rotary_pos_cos, rotary_pos_sin,
                       rest: dict) -> torch.Tensor:
        packed = rest.get("packed_seq_params")
        detach = self.detach_trunk
        # no padding_mask (which megatron 0.17+ takes): under sequence parallelism it arrives split over the
        # TP ranks, and the MTP layer would shift the slice with the whole pack's boundaries. So the MTP
        # layer's router counts padding in its balancing statistics, as on 0.16, which takes none
        stacked = self.mtp(
            input_ids=input_ids, position_ids=position_ids, hidden_states=hidden.detach() if detach else hidden,
            attention_mask=rest.get("attention_mask"), rotary_pos_emb=rotary_pos_emb,
            rotary_pos_cos=rotary_pos_cos, rotary_pos_sin=rotary_pos_sin, packed_seq_params=packed,
            sequence_len_offset=rest.get("sequence_len_offset"),
            embedding=_DetachedEmbedding(self.embedding) if detach else self.embedding)
        depth_states = torch.chunk(stacked, 1 + self.config.mtp_num_layers, dim=0)[1:]
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        if detach:
            weight = (weight if weight is not None else self.output_layer.weight).detach()
        targets, mask, token_weight = self._targets
        mask = mask.float()
        sums, counts = [], []
        for states in depth_states:
            targets, _ = roll_tensor(targets, shifts=-1, dims=-1, packed_seq_params=packed)
            mask, count = roll_tensor(mask, shifts=-1, dims=-1, packed_seq_params=packed)
            # .forward: hooks on the output layer (logits windows) are for the main logits
            logits, _ = self.output_layer.forward(states, weight=weight,
                                                  runtime_gather_output=rest.get("runtime_gather_output"))
            ce = self.compute_language_model_loss(targets, logits)  # [b, s]
            sums.append((ce * mask).sum())
            counts.append(count.clamp(min=1))
        sums = torch.stack(sums)
        counts = torch.stack(counts).to(sums.dtype)
        self.mtp_losses.append((sums / counts).detach())
        per_depth = sums * token_weight if token_weight is not None else sums / counts
        loss = self.config.mtp_loss_scaling_factor / len(sums) * per_depth.sum()
        return MTPLossAutoScaler.apply(hidden, loss)


class _DetachedEmbedding(torch.nn.Module):
    """The model's embedding, its output cut from the graph (MTP under RL reads it, never trains it)."""

    def __init__(self, embedding: torch.nn.Module):
        super().__init__()
        self.inner = [embedding]  # a list: not registered as a submodule

    def forward(self, **kwargs):
        return self.inner[0](**kwargs).detach()


@contextmanager
def predicting_further(model: torch.nn.Module, targets: torch.Tensor, mask: torch.Tensor,
                       token_weight: Optional[float] = None) -> Iterator[None]:
    """While open, `model`'s forward (a chunk with MTP layers, wrapped or not) trains them: `targets` [b, s]
    is each input position's next token, `mask` [b, s] where a loss reads it, `token_weight` what the
    step's loss multiplies a token's loss by (None: a per-micro-batch mean; see the module doc)."""
    chunk = unwrap_model(model)
    chunk._targets = (targets, mask, token_weight)
    try:
        yield
    finally:
        chunk._targets = None


def mtp_chunks(chunks) -> List[MTPGPTModel]:
    """The chunks (wrapped or not) that hold MTP layers."""
    return [c for c in map(unwrap_model, chunks) if isinstance(c, MTPGPTModel) and c.mtp_process]


def runs_mtp(model: torch.nn.Module) -> bool:
    chunk = unwrap_model(model)
    return isinstance(chunk, MTPGPTModel) and chunk.mtp_process


def detach_from_trunk(chunks) -> None:
    """RL: the MTP loss trains the MTP layers alone (see MTPGPTModel.detach_trunk)."""
    for chunk in mtp_chunks(chunks):
        chunk.detach_trunk = True


def mtp_metrics(chunks) -> Dict[str, float]:
    """The MTP cross-entropy of the forwards since the last call, averaged over them and the data-parallel
    ranks: `mtp/loss` over all depths, and `mtp/loss_<k>` per depth when there are several; {} for a
    model without MTP layers. Collective: every rank calls it (the layers live on the last stage)."""
    depths = get_model_config(chunks[0]).mtp_num_layers
    if not depths:
        return {}
    sums = torch.zeros(depths + 1, dtype=torch.float64)
    for chunk in mtp_chunks(chunks):
        for means in chunk.mtp_losses:
            sums[:depths] += means.double().cpu()
            sums[depths] += 1
        chunk.mtp_losses.clear()
    sums = reduce_last_stage(sums)
    per_depth = sums[:depths] / sums[depths].clamp(min=1)
    out = {"mtp/loss": float(per_depth.mean())}
    if depths > 1:
        out.update({f"mtp/loss_{k + 1}": float(v) for k, v in enumerate(per_depth)})
    return out
