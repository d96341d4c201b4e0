"""The allowed values of every config key that takes one of a fixed set, and the check that refuses others.

Each set is a `Literal`, declared here once. The schema annotates such a field as
`Annotated[str, <the Literal>]`: OmegaConf 2.3 refuses `Literal` annotations in structured
configs, but `typing.get_type_hints` drops `Annotated` metadata unless asked for it, so OmegaConf
types the field as a plain string while `check_choices` reads the `Literal` back from the
annotation. The loader runs `check_choices` on every config it composes (r1mega.config.loader.
to_config), so a value outside the set is refused before any rule runs or any process starts,
with the key and the allowed values in the message. Rules that need a set take it from here
with `typing.get_args`.

This module imports nothing of r1mega but the error type: packages below the config (rewards)
take their names from it.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any, Dict, Iterator, Literal, Optional, Tuple, get_args, get_origin

from r1mega.config.errors import one_of

# model
Arch = Literal["qwen2", "qwen3", "llama", "qwen3_moe", "deepseek_v2", "deepseek_v3"]
Dtype = Literal["fp32", "bf16", "fp16"]
AttentionBackend = Literal["auto", "te", "flash", "sdpa"]
LoadBalancing = Literal["aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none"]  # megatron's
ScoreFunction = Literal["softmax", "sigmoid"]
TokenDispatcher = Literal["allgather", "alltoall"]
FP8Format = Literal["hybrid", "e4m3"]
FP8Recipe = Literal["delayed", "tensorwise", "blockwise", "mxfp8"]
# optimizer (and pretrain.optimizer)
OptimizerName = Literal["adam", "sgd"]
DecayStyle = Literal["constant", "linear", "cosine"]
# data, warm-up, SFT
DataName = Literal["arithmetic", "countdown", "code", "files"]  # files: data.train_path; the rest are built in
PromptTemplate = Literal["r1_zero", "chat", "plain"]
SFTTemplate = Literal["chat", "r1_zero"]
OnBadRow = Literal["skip", "error"]
Corpus = Literal["task", "synthetic"]
# algorithm
AdvantageMode = Literal["grpo", "drgrpo", "rloo", "batch_std"]
StdConvention = Literal["sample", "population"]
RatioLevel = Literal["token", "sequence"]
CorrectionLevel = Literal["token", "sequence", "geometric"]  # of pi_prox / pi_rollout (algorithms.off_policy)
KLEstimator = Literal["k1", "k2", "k3"]
AggregationMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
RoutingReplay = Literal["none", "rollout", "old"]  # MoE routing in training: own | rollout (R3) | old policy (R2)
# rollout, reward
Engine = Literal["native", "sglang"]
SGLangMode = Literal["colocated", "disaggregated"]
RolloutMode = Literal["sync", "async"]  # async: rollout workers generate while the trainer trains
PartialKV = Literal["keep", "recompute"]  # a partial rollout's KV cache after a weight update
WorkerFailure = Literal["stop", "continue"]  # a rollout worker lost: checkpoint and stop, or go on without it
StaleSamples = Literal["drop", "regenerate"]  # a group over algorithm.max_staleness: discarded, or its prompt again
RewardName = Literal["accuracy", "format", "language", "overlong"]  # the built-in reward components
CodeSandbox = Literal["bwrap", "none"]  # how model-written programs run: bubblewrap, or unsandboxed (warned)
CodeLanguage = Literal["python", "cpp"]  # r1mega.rewards.code.LANGUAGES
# pipeline, cluster, bench
StageKind = Literal["cold_start_data", "eval", "sft", "rl", "opd", "sample"]  # opd: r1mega-train with algorithm=opd
Launcher = Literal["torchrun", "srun"]
WarningSignal = Literal["USR1", "USR2"]  # what r1mega's trainers take as the time-limit warning
BenchSuite = Literal["step", "train", "rollout", "packing", "peer", "async"]
RolloutPromptSet = Literal["task", "long_tailed"]  # the run's task prompts; lognormal lengths, random tokens


def literal_of(hint: Any) -> Optional[Tuple[Tuple[str, ...], bool, bool]]:
    """(allowed values, may be None, is a list of them) of a field annotated with a choice set, else None.

    Understood: Annotated[str, L], Optional[...] of it, Annotated[Optional[str], L] and List[...] of it."""
    optional = False
    if get_origin(hint) is typing.Union:
        args = [a for a in get_args(hint) if a is not type(None)]
        optional = len(args) < len(get_args(hint))
        if len(args) != 1:
            return None
        hint = args[0]
    if get_origin(hint) in (list, typing.List):
        inner = literal_of(get_args(hint)[0])
        return None if inner is None else (inner[0], optional, True)
    if get_origin(hint) is typing.Annotated:
        base, *meta = get_args(hint)
        for m in meta:
            if get_origin(m) is Literal:
                return get_args(m), optional or _is_optional(base), False
    return None


def _is_optional(hint: Any) -> bool:
    return get_origin(hint) is typing.Union and type(None) in get_args(hint)


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> Dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def check_choices(obj: Any, prefix: str = "") -> None:
    """Raise ConfigError on the first choice field of this dataclass (and the ones inside it) whose
    value is not in its set; `prefix` is the object's key in the whole config ("model.")."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        return
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), prefix + f.name
        choice = literal_of(hints[f.name])
        if choice is not None:
            allowed, optional, many = choice
            for v in (value if many else [value]):
                if not (v is None and optional):
                    one_of(v, allowed, key)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                check_choices(item, f"{key}[{i}].")
        else:
            check_choices(value, key + ".")


def choice_fields(cls: type, prefix: str = "") -> Iterator[Tuple[str, Tuple[str, ...], bool]]:
    """(key, allowed values, may be None) of every choice field under a schema class, nested dataclasses
    included whether or not they are set by default: `model.moe.score_function`, `pipeline.stages[].kind`,
    `bench.suites[]`."""
    for f in dataclasses.fields(cls):
        hint, key = _hints(cls)[f.name], prefix + f.name
        choice = literal_of(hint)
        if choice is not None:
            allowed, optional, many = choice
            yield key + ("[]" if many else ""), allowed, optional
            continue
        inner = _dataclass_in(hint)
        if inner is not None:
            inner_cls, many = inner
            yield from choice_fields(inner_cls, key + ("[]." if many else "."))


def _dataclass_in(hint: Any) -> Optional[Tuple[type, bool]]:
    """The dataclass of a field typed X, Optional[X] or List[X], and whether it is a list."""
    if get_origin(hint) is typing.Union:
        args = [a for a in get_args(hint) if a is not type(None)]
        if len(args) != 1:
            return None
        hint = args[0]
    if get_origin(hint) in (list, typing.List):
        inner = _dataclass_in(get_args(hint)[0])
        return None if inner is None else (inner[0], True)
    return (hint, False) if dataclasses.is_dataclass(hint) else None
