"""A stand-in SGLang server for contract tests: the HTTP routes and bodies r1mega uses, checked the
way sglang 0.5.23 checks them, over a transformers model of the same config.

It refuses what the real server refuses (unknown sampling keys, non-integer counts, weight
updates outside a begin/end session or while weights are released, generation while its memory
is released) and adds the checks of the contract: every received tensor has the name, shape and
dtype of the HF model's own, and each arrives exactly once per session. It records every call.

It also does what 0.5.23 does to the weights and to sampling:
- releasing `weights` unmaps them without a copy unless the server runs with
  --enable-weights-cpu-backup (torch_memory_saver's pause; the scheduler stashes only buffers),
  and resuming maps fresh memory that is never cleared: the parameters hold whatever the pages
  held before, here finite garbage, until the next weight sync;
- releasing memory while requests run trips the scheduler's assertion and kills it: every later
  request fails;
- with --enable-deterministic-inference each token is drawn with Gumbel noise hashed from
  (sampling_seed, position) alone, 42 when a request has no seed: two requests with one seed
  sample the same tokens; otherwise sampling_seed is ignored and the server's generator draws;
- decoding keeps a KV cache per request; /pause_generation mode=retract drops it (computed again under
  the weights current at /continue_generation), in_place keeps it, abort ends every request with
  finish_reason abort and its tokens so far. New /generate calls wait while paused;
- a running /generate holds the tokenizer's model_update_lock as a reader: an unpaused weight-update
  call (begin, update, end) waits for every running request and holds new ones back (writers first);
  a paused one goes straight in;
- an update with a new weight_version records, for every live request, where the old version ended;
  a finished request reports meta_info weight_version and, if it saw a change, weight_versions spans;
- flush_cache and release_memory_occupation need an idle server, where a retract pause leaves the
  waiting requests out of account (they hold no KV);
- init_weights_update_group joins the trainer's group at rank_offset over a TCP store (gloo here);
- MoE experts load by their checkpoint names, one tensor per expert (transformers holds them fused);
  DeepSeek's q_a_proj and kv_a_proj_with_mqa load only when one call brings both, as the DeepSeek
  loader fuses them (deepseek_weight_loader.py); a half that comes alone is dropped without a word
  (the contract check at end_weight_update then finds it missing);
- with --enable-return-routed-experts, a request with return_routed_experts gets meta_info
  routed_experts: base64 of int32 [prompt + output - 1, num_hidden_layers, top-k], each position's
  experts from the forward that computed its KV cache, dense layers 0 (state_capturer/routed_experts.py);
  without the flag the field is absent.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List

import torch

# sglang 0.5.23, api/v1/api_types.py SamplingParams: unknown keys are refused, counts must be integers
SAMPLING_KEYS = {"max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k", "min_p",
                 "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n", "json_schema",
                 "regex", "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens",
                 "spaces_between_special_tokens", "no_stop_trim", "stream_interval", "logit_bias", "sampling_seed",
                 "custom_params", "beam_width", "watermark", "choice"}
INT_KEYS = {"max_new_tokens", "top_k", "min_new_tokens", "n", "stream_interval", "sampling_seed", "beam_width"}
TAGS = {"weights", "kv_cache", "cuda_graph"}
_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
FUSED_PAIR = ("self_attn.q_a_proj.weight", "self_attn.kv_a_proj_with_mqa.weight")


def checkpoint_names(state: Dict[str, torch.Tensor]) -> Dict[str, tuple]:
    """(shape, dtype) of every tensor by its checkpoint name: transformers 5 holds a layer's experts fused
    (experts.gate_up_proj [E, 2I, H], experts.down_proj [E, H, I]), checkpoints and SGLang per expert."""
    out = {}
    for name, t in state.items():
        if name.endswith(".mlp.experts.gate_up_proj"):
            prefix = name[:-len(".gate_up_proj")]
            for e in range(t.shape[0]):
                for part in ("gate", "up"):
                    out[f"{prefix}.{e}.{part}_proj.weight"] = ((t.shape[1] // 2, t.shape[2]), t.dtype)
        elif name.endswith(".mlp.experts.down_proj"):
            prefix = name[:-len(".down_proj")]
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.down_proj.weight"] = ((t.shape[1], t.shape[2]), t.dtype)
        else:
            out[name] = (tuple(t.shape), t.dtype)
    return out


def checkpoint_view(state: Dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The part of the model's tensors that checkpoint tensor `name` is."""
    expert = _EXPERT.match(name)
    if expert is None:
        return state[name]
    prefix, e, part = expert.group(1), int(expert.group(2)), expert.group(3)
    if part == "down":
        return state[prefix + ".down_proj"][e]
    gate, up = state[prefix + ".gate_up_proj"][e].chunk(2, dim=0)
    return gate if part == "gate" else up


class Refused(Exception):
    pass


class Dead(Exception):
    """The scheduler process died (the real server exits; its clients see failed requests)."""


@dataclass
class FlattenedTensorMetadata:
    """Stands for sglang.srt.weight_sync.tensor_bucket.FlattenedTensorMetadata (same fields)."""

    name: str
    shape: torch.Size
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int


def use_stub_metadata() -> None:
    """Make r1mega pack buckets with the stand-in's metadata class (sglang is not installed here)."""
    import r1mega.rollout.sglang.buckets as b

    b._meta_class = lambda: FlattenedTensorMetadata


class SafeUnpickler(pickle.Unpickler):
    """SGLang's rule: only tensors, storages, dtypes, plain containers and the bucket metadata."""

    ALLOWED = {("builtins", n) for n in ("list", "dict", "tuple", "set", "int", "float", "str", "bytes")} | {
        ("collections", "OrderedDict"), (__name__, "FlattenedTensorMetadata"),
        ("multiprocessing.resource_sharer", "DupFd")}  # CPU storages only; CUDA ones travel as IPC handles

    def find_class(self, module, name):
        if module.startswith("torch") or (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"Blocked unsafe global {module}.{name}")


def loads(payload: str):
    return SafeUnpickler(io.BytesIO(base64.b64decode(payload, validate=True))).load()


class StandIn:
    """The engine state behind one server; `tp` payload entries per weight update."""

    def __init__(self, model_cfg, tp: int, seed: int, server_args: Dict | None = None, hf_path: str | None = None):
        """hf_path: serve that checkpoint's weights (a server started on a model folder), else random ones."""
        from transformers import AutoModelForCausalLM

        from r1mega.checkpoint.hf_config import transformers_config

        # a server is a process of its own: the trainer's random stream (its ranks' initial weights) stays untouched
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if hf_path is not None:
                self.model = AutoModelForCausalLM.from_pretrained(hf_path, torch_dtype=torch.float32,
                                                                  local_files_only=True)
            else:
                self.model = AutoModelForCausalLM.from_config(transformers_config(model_cfg),
                                                              torch_dtype=torch.float32)
        self.model.eval()
        self.expected = {k: v for k, v in checkpoint_names(self.model.state_dict()).items()
                         if not (k == "lm_head.weight" and model_cfg.tie_word_embeddings)}
        self.fuses_a_proj = model_cfg.mla is not None and model_cfg.mla.q_lora_rank is not None
        self.tp = tp
        args = {str(k).replace("-", "_"): v for k, v in (server_args or {}).items()}
        self.return_routed_experts = bool(args.get("enable_return_routed_experts"))
        self.topk = model_cfg.moe.router_topk if model_cfg.moe is not None else 0
        self.routed: Dict[int, torch.Tensor] = {}  # layer -> experts [tokens, k] of the forward running now
        for i, layer in enumerate(self.model.model.layers):
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None and type(gate).__name__.lower().endswith("topkrouter"):
                gate.register_forward_hook(lambda mod, args, out, i=i: self.routed.__setitem__(i, out[2].detach()))
        self.weights_cpu_backup = bool(args.get("enable_weights_cpu_backup"))
        self.deterministic = bool(args.get("enable_deterministic_inference"))
        self.dead = None  # why the scheduler died: every request fails from then on
        self.resident = set(TAGS)
        self.session = None  # names received in the open session
        self.busy = 0
        self.calls: List[tuple] = []
        self.seeds: List = []  # sampling_seed of every request, in order
        self.lock = threading.Lock()
        self.generator = torch.Generator().manual_seed(seed)
        self.group, self.group_name = None, "r1mega-weights"  # disaggregated: the weight-update group
        self.weight_version = "default"
        self.live: List[dict] = []  # running requests: their tokens so far and weight-version events
        self.sched = threading.Condition(self.lock)  # the scheduler: one decode step at a time
        self.paused = None  # None | "retract" | "in_place" (the scheduler's); abort leaves it running
        self.tokenizer_paused = False  # new /generate calls wait
        self.retracts = 0  # retract pauses so far: a request that saw one drops its KV cache
        self.readers, self.writer, self.writers_waiting = 0, False, 0  # model_update_lock
        # test knobs, beyond the real server, so that a weight update lands mid-request on any machine:
        # requests whose sampling_seed is in hold[0] wait before output position hold[1] until the weights
        # change, and those in gate decode nothing until one of them got there; die_at: the scheduler dies
        # at that /generate call (1-based)
        self.hold, self.gate, self.die_at, self.hold_reached = None, None, None, False

    WEIGHT_ROUTES = {"/begin_weight_update", "/end_weight_update", "/update_weights_from_tensor",
                     "/update_weights_from_distributed"}

    def handle(self, route: str, body) -> object:
        if self.dead is not None:
            raise Dead(f"the scheduler died: {self.dead}")
        route = route.split("?")[0]
        handler = getattr(self, "r_" + route.strip("/"), None)
        if handler is None:
            raise Refused(f"no route {route}")
        if route not in self.WEIGHT_ROUTES:
            return handler(body)
        with self.sched:  # tokenizer_manager: paused, straight in; else the writer lock
            paused = self.tokenizer_paused
            if not paused:
                self.writers_waiting += 1
                self.sched.wait_for(lambda: not self.writer and self.readers == 0)
                self.writers_waiting -= 1
                self.writer = True
        try:
            return handler(body)
        finally:
            if not paused:
                with self.sched:
                    self.writer = False
                    self.sched.notify_all()

    def r_health(self, body):
        """0.5.23's /health runs a one-token generation: it waits out a pause and a weight update (20 s)."""
        with self.sched:
            if not self.sched.wait_for(lambda: not self.tokenizer_paused and not self.writer, timeout=20):
                raise Dead("UnHealthy")
        return None

    def r_model_info(self, body):
        return {"model_path": "stand-in", "is_generation": True, "weight_version": self.weight_version}

    def r_pause_generation(self, body):
        mode = (body or {}).get("mode", "abort")
        if mode not in ("abort", "retract", "in_place"):
            raise Refused(f"mode={mode!r} is not one of abort, retract, in_place")
        with self.sched:
            self.tokenizer_paused = True
            if mode == "abort":  # every request ends now with its tokens so far; returns once all have
                for req in self.live:
                    req["abort"] = True
                self.sched.notify_all()
                self.sched.wait_for(lambda: not self.live)
            else:
                self.paused = mode
                self.retracts += mode == "retract"
            self.calls.append(("pause", mode))
        return {"message": "Generation paused successfully.", "status": "ok"}

    def r_continue_generation(self, body):
        with self.sched:
            self.paused, self.tokenizer_paused = None, False
            self.sched.notify_all()
            self.calls.append(("continue",))
        return {"message": "Generation continued successfully.", "status": "ok"}

    def _next(self):
        """The row to decode: the first admitted among those decoding (a call's rows go one after another)
        and not held."""
        return next((r for r in self.live if r.get("active") and not r["waits"]), None)

    def _idle(self) -> bool:
        """scheduler.is_fully_idle(ignore_waiting=paused): retracted requests wait without KV."""
        return not self.live or self.paused == "retract"

    # -- routes ------------------------------------------------------------------------------

    def r_ready(self, body):
        return None

    def r_server_info(self, body):
        return {"version": "0.5.23"}

    def r_generate(self, body):
        prompts = body["input_ids"]
        per_prompt = body["sampling_params"]  # one dict for all prompts, or one per prompt
        per_prompt = per_prompt if isinstance(per_prompt, list) else [per_prompt] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise Refused(f"{len(per_prompt)} sampling_params for {len(prompts)} prompts")
        if len({p.get("n", 1) for p in per_prompt}) > 1:  # io_struct: parallel sampling reads n of the first
            raise Refused("the parallel sampling number must be the same for every request of a batch")
        starts = body.get("logprob_start_len", -1)  # one for all, or one per request (then n must be 1)
        if isinstance(starts, list) and per_prompt[0].get("n", 1) > 1:
            raise Refused("per-request logprob_start_len with parallel sampling (n > 1)")
        starts = starts if isinstance(starts, list) else [starts] * len(prompts)
        for start, prompt in zip(starts, prompts):
            if start > len(prompt):  # tokenizer_manager: aborted with 400
                raise Refused(f"logprob_start_len ({start}) is higher than the number of input tokens "
                              f"({len(prompt)}). Request with a lower logprob_start_len.")
        for params in per_prompt:
            unknown = set(params) - SAMPLING_KEYS
            if unknown:
                raise Refused(f"unknown sampling params {sorted(unknown)}")
            for key in INT_KEYS & set(params):
                if not isinstance(params[key], int):
                    raise Refused(f"{key} must be an integer")
        if not body.get("return_logprob"):
            raise Refused("r1mega always asks for log-probs")
        with self.sched:
            self.sched.wait_for(lambda: not self.tokenizer_paused)
            self.sched.wait_for(lambda: not self.writer and not self.writers_waiting)  # the reader lock
            if self.resident != TAGS:  # the real server would touch unmapped memory
                raise Refused(f"generate with resident={sorted(self.resident)}")
            if self.die_at is not None and sum(c[0] == "generate" for c in self.calls) + 1 >= self.die_at:
                self.dead = "killed by the test"
                raise Dead(self.dead)
            self.readers += 1
            self.busy += 1
            self.calls.append(("generate", len(prompts), per_prompt[0].get("n", 1)))
            self.seeds += [p.get("sampling_seed") for p in per_prompt]
            reqs = [{"out": [], "events": [], "abort": False, "started": self.weight_version, "waits": False,
                     "held": self.hold is not None and p.get("sampling_seed") in self.hold[0],
                     "gated": self.gate is not None and p.get("sampling_seed") in self.gate}
                    for p in per_prompt for _ in range(p.get("n", 1))]
            self.live += reqs
        try:
            rows = [(p, params, start) for p, params, start in zip(prompts, per_prompt, starts)
                    for _ in range(params.get("n", 1))]
            routed = bool(body.get("return_routed_experts")) and self.return_routed_experts
            out = [self._sample(p, params, req, routed) for (p, params, _), req in zip(rows, reqs)]
            top = body.get("top_logprobs_num") or 0
            for o, (p, _, start) in zip(out, rows):
                o["meta_info"]["input_token_logprobs"], tops = self._input_logprobs(p, start, top)
                if top:
                    o["meta_info"]["input_top_logprobs"] = tops
            return out
        finally:
            with self.sched:
                self.live = [r for r in self.live if not any(r is q for q in reqs)]
                self.readers -= 1
                self.busy -= 1
                self.sched.notify_all()

    def r_release_memory_occupation(self, body):
        return self._memory(body, release=True)

    def r_resume_memory_occupation(self, body):
        return self._memory(body, release=False)

    def r_begin_weight_update(self, body):
        if self.session is not None:
            return {"success": False, "message": "a weight-update session is already open"}
        self.session = set()
        self.calls.append(("begin",))
        return {"success": True, "message": ""}

    def r_update_weights_from_tensor(self, body):
        if self.session is None:
            return {"success": False, "message": "update_weights_from_tensor must run between "
                                                 "begin_weight_update() and end_weight_update()"}
        payloads = body["serialized_named_tensors"]
        if len(payloads) < self.tp or body["load_format"] != "flattened_bucket":
            return {"success": False, "message": f"{len(payloads)} payloads for tp={self.tp}, "
                                                 f"load_format={body['load_format']}"}
        per_rank = [_reconstruct(loads(p)) for p in payloads]
        for other in per_rank[1:]:
            if [n for n, _ in other] != [n for n, _ in per_rank[0]] or any(
                    not torch.equal(a, b) for (_, a), (_, b) in zip(per_rank[0], other)):
                return {"success": False, "message": "TP ranks got different tensors"}
        return self._load(per_rank[0], body["weight_version"])

    def r_init_weights_update_group(self, body):
        self.calls.append(("init_group", body["rank_offset"], body["world_size"], body["group_name"]))
        if self.tp != 1:
            return {"success": False, "message": "the stand-in joins as one rank (tp=1)"}
        if self.group is None:  # SGLang's init_custom_process_group, over gloo
            self.group_name = body["group_name"]
            self.group = gloo_group(body["master_address"], body["master_port"], body["world_size"],
                                    body["rank_offset"], body["group_name"])
        return {"success": True, "message": ""}

    def r_update_weights_from_distributed(self, body):
        """Receive one broadcast of a FlattenedTensorBucket.empty layout from group rank 0."""
        import torch.distributed as dist

        if self.session is None:
            return {"success": False, "message": "update_weights_from_distributed must run between "
                                                 "begin_weight_update() and end_weight_update()"}
        if body["load_format"] != "flattened_bucket" or body["group_name"] != self.group_name:
            return {"success": False, "message": f"load_format={body['load_format']} group={body['group_name']}"}
        metas, offset = [], 0
        for name, dtype, shape in zip(body["names"], body["dtypes"], body["shapes"], strict=True):
            dtype = getattr(torch, dtype)
            if offset % dtype.itemsize:
                return {"success": False, "message": f"Unaligned received tensor {name}: byte offset {offset}"}
            size = torch.Size(shape).numel() * dtype.itemsize
            metas.append((name, dtype, torch.Size(shape), offset, offset + size))
            offset += size
        flat = torch.empty(offset, dtype=torch.uint8)
        options = dist.BroadcastOptions()
        options.rootRank, options.rootTensor = 0, 0
        self.group.broadcast([flat], options).wait()
        named = [(n, flat[a:b].view(d).reshape(sh).clone()) for n, d, sh, a, b in metas]
        return self._load(named, body["weight_version"])

    def _load(self, named, version):
        with self.sched:  # between decode steps
            try:
                return self._load_locked(named, version)
            finally:
                self.sched.notify_all()

    def _load_locked(self, named, version):
        if "weights" not in self.resident:
            return {"success": False, "message": "weights are released"}
        if version is not None and version != self.weight_version:  # record_weight_version_change
            for req in self.live:
                req["events"].append((self.weight_version, len(req["out"])))
            self.weight_version = version
        state = self.model.state_dict()
        if self.fuses_a_proj:  # the DeepSeek loader drops a fused half that comes without its partner
            layers = {n[:-len(s)] for n, _ in named for s in FUSED_PAIR if n.endswith(s)}
            pairs = {layer for layer in layers if all(layer + s in dict(named) for s in FUSED_PAIR)}
            named = [(n, t) for n, t in named if not any(n.endswith(s) and n[:-len(s)] not in pairs
                                                         for s in FUSED_PAIR)]
        for name, tensor in named:
            if name not in self.expected:
                return {"success": False, "message": f"{name} is not a parameter of the HF model"}
            if (tuple(tensor.shape), tensor.dtype) != self.expected[name]:
                return {"success": False, "message": f"{name}: {tuple(tensor.shape)} {tensor.dtype}, expected "
                                                     f"{self.expected[name]}"}
            if not torch.isfinite(tensor).all():
                return {"success": False, "message": f"{name} has NaN or inf values"}
            if name in self.session:
                return {"success": False, "message": f"{name} sent twice in one session"}
            self.session.add(name)
            with torch.no_grad():
                checkpoint_view(state, name).copy_(tensor)
        self.calls.append(("update", len(named), version))
        return {"success": True, "message": "Success"}

    def r_end_weight_update(self, body):
        if self.session is None:
            return {"success": False, "message": "no open session"}
        missing = set(self.expected) - self.session
        self.session = None
        if missing:
            return {"success": False, "message": f"{len(missing)} parameters never arrived: {sorted(missing)[:3]}"}
        self.calls.append(("end",))
        return {"success": True, "message": ""}

    def r_flush_cache(self, body):
        if not self._idle():
            raise Refused("requests are running")
        self.calls.append(("flush",))
        return "Cache flushed."

    # -- helpers -----------------------------------------------------------------------------

    def _memory(self, body, release: bool):
        tags = set(body["tags"] or TAGS)
        with self.lock:
            if release and not self._idle():  # weight_updater.release_memory_occupation asserts the server is idle
                self.dead = "release_memory_occupation should be called only when server is idle"
                raise Dead(self.dead)
            if not tags <= TAGS:
                raise Refused(f"unknown tags {tags - TAGS}")
            if release and "weights" in tags & self.resident and not self.weights_cpu_backup:
                self._lose_weights()
            self.resident = self.resident - tags if release else self.resident | tags
            self.calls.append(("release" if release else "resume", tuple(sorted(tags))))
        return None

    @torch.no_grad()
    def _lose_weights(self) -> None:
        """What the parameters hold after an unbacked release and a resume: stale pages, not the
        weights (buffers, such as rotary tables, are stashed and come back)."""
        garbage = torch.Generator().manual_seed(len(self.calls))
        for p in self.model.parameters():
            p.copy_(torch.randn(p.shape, generator=garbage) * 3)

    @torch.no_grad()
    def _input_logprobs(self, ids: List[int], start: int, top: int = 0) -> tuple:
        """logprob_result_processor: from `start` on, each input token's log-prob given the ones before it, of
        the raw logits (no temperature); the first entry's is None (never computed); -1: none (output only).
        With `top`, the k most likely tokens of the same distributions, aligned the same way (first None).
        Ids at vocab_size - 1 come back as 0 in input_token_logprobs (those ids are clipped; the values and the
        top log-probs' ids are not)."""
        if start < 0 or start >= len(ids):
            return [], []
        with torch.no_grad():
            logp = torch.log_softmax(self.model(torch.tensor([ids])).logits[0].float(), dim=-1)
        last = self.model.config.vocab_size - 1
        shown = lambda t: t if t < last else 0  # noqa: E731
        tokens = [[None, shown(ids[start]), None]] + [[float(logp[j - 1, ids[j]]), shown(ids[j]), None]
                                                      for j in range(start + 1, len(ids))]
        tops = [None]
        for j in range(start + 1, len(ids)):
            values, best = logp[j - 1].topk(top) if top else (torch.zeros(0), torch.zeros(0))
            tops.append([[float(v), int(t), None] for v, t in zip(values, best)])  # (only the tokens' ids are)
        return tokens, tops

    def _sample(self, prompt: List[int], params: Dict, req: dict, routed: bool = False) -> dict:
        ids, out, logprobs = list(prompt), req["out"], []
        experts: Dict[int, torch.Tensor] = {}  # position -> [num_hidden_layers, k], from the forward that cached it
        layers = len(self.model.model.layers)
        finish = {"type": "length", "length": params.get("max_new_tokens", 128)}
        past, retracts, retractions = None, self.retracts, 0
        req["active"] = True
        for position in range(params.get("max_new_tokens", 128)):
            with self.sched:  # one decode step, never across a pause or a weight load
                if req["gated"] and position == 0:
                    req["waits"] = True
                    if not self.sched.wait_for(lambda: self.hold_reached, timeout=120):
                        raise RuntimeError(f"gated row: no held row reached its hold point; calls {self.calls[-8:]}")
                    req["waits"] = False
                if req["held"] and position == self.hold[1]:
                    req["waits"], self.hold_reached = True, True
                    self.sched.notify_all()
                    if not self.sched.wait_for(lambda: self.weight_version != req["started"], timeout=120):
                        raise RuntimeError(f"held row: no weight update; calls {self.calls[-8:]}")
                    req["waits"] = False
                # first come, first served, a row at a time (a held row steps aside): requests finish in
                # the order they came
                self.sched.wait_for(lambda: (self.paused is None and self._next() is req) or req["abort"])
                if req["abort"]:
                    finish = {"type": "abort", "message": "Aborted", "status_code": None, "err_type": None}
                    break
                if self.retracts != retracts:  # retracted: its KV cache was freed
                    past, retracts, retractions = None, self.retracts, retractions + 1
                first = 0 if past is None else len(ids) - 1
                self.routed = {}
                step = self.model(torch.tensor([ids[first:]]), past_key_values=past, use_cache=True)
                for p in range(first, len(ids)):
                    experts[p] = torch.zeros(layers, self.topk, dtype=torch.int32)
                    for layer, chosen in self.routed.items():
                        experts[p][layer] = chosen[p - first].int()
                past, logits = step.past_key_values, step.logits[0, -1].float()
                temperature = params.get("temperature", 1.0)
                greedy = temperature == 0  # SGLang: temperature 0 is greedy, log-probs unscaled
                logp = torch.log_softmax(logits / (1.0 if greedy else temperature), dim=-1)
                if greedy:
                    token = int(logp.argmax())
                elif self.deterministic:  # sampler.multinomial_with_seed: noise from (seed, position) only
                    seed = params.get("sampling_seed")
                    noise = torch.Generator().manual_seed(hash((42 if seed is None else seed, len(ids) - 1)) &
                                                          (2**63 - 1))
                    u = torch.rand(logp.shape, generator=noise, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
                    token = int((logp.double() - torch.log(-torch.log(u))).argmax())
                else:
                    token = int(torch.multinomial(logp.exp(), 1, generator=self.generator))
                out.append(token)
                logprobs.append([float(logp[token]), token, None])
                ids.append(token)
            if token in (params.get("stop_token_ids") or []):
                finish = {"type": "stop", "matched": token}
                break
        with self.sched:
            self.live = [r for r in self.live if r is not req]
            self.sched.notify_all()
        meta = {"finish_reason": finish, "output_token_logprobs": logprobs, "completion_tokens": len(out),
                "weight_version": self.weight_version, "num_retractions": retractions}
        if req["events"]:  # add_weight_versions_to_meta_info
            spans, start = [], 0
            for version, end in req["events"]:
                spans.append({"version": version, "start": start, "end": end})
                start = end
            spans.append({"version": self.weight_version, "start": start, "end": len(out)})
            meta["weight_versions"] = spans
        if routed:  # every position but the last token's (sampled, never fed)
            rows = torch.stack([experts[p] for p in range(len(prompt) + len(out) - 1)])
            meta["routed_experts"] = base64.b64encode(rows.numpy().tobytes()).decode()
        return {"output_ids": list(out), "meta_info": meta}


def gloo_group(master_address: str, master_port: int, world_size: int, rank: int, group_name: str,
               timeout_s: float = 120.0):
    """A group of its own over a TCP store (rank 0 hosts it), as SGLang's init_custom_process_group makes
    one, on gloo; the trainer's side in tests too (NcclTransport's init_group)."""
    import datetime

    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(master_address, master_port, world_size, is_master=rank == 0, timeout=timeout)
    return dist.ProcessGroupGloo(dist.PrefixStore(group_name, store), rank, world_size, timeout)


def trainer_group(master_address: str, master_port: int, world_size: int, group_name: str):
    """NcclTransport's init_group on CPU: the trainer's end (rank 0) of gloo_group."""
    return gloo_group(master_address, master_port, world_size, 0, group_name)


def _reconstruct(payload) -> List[tuple]:
    """SGLang's FlattenedTensorBucket.reconstruct_tensors, with its alignment rule checked."""
    flat, out = payload["flattened_tensor"], []
    assert flat.dtype == torch.uint8
    for m in payload["metadata"]:
        assert m.start_idx % m.dtype.itemsize == 0, f"{m.name} is not aligned"
        assert m.end_idx - m.start_idx == m.numel
        out.append((m.name, flat[m.start_idx:m.end_idx].view(m.dtype).reshape(m.shape).clone()))
    return out


def serve(standin: StandIn) -> ThreadingHTTPServer:
    """Serve `standin` on a free local port in a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, method):
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            if method == "POST" and body is None and self.path != "/flush_cache":
                return self._send(422, {"detail": "a JSON body is required"})
            try:
                result = standin.handle(self.path, body)
            except Refused as err:
                return self._send(400, {"error": str(err)})
            except Dead as err:
                return self._send(503, {"error": str(err)})
            except Exception as err:  # a server error, as the real one answers it: never a hang
                return self._send(500, {"error": f"{type(err).__name__}: {err}"})
            failed = isinstance(result, dict) and result.get("success") is False
            self._send(400 if failed else 200, result)

        def _send(self, code, result):
            raw = (result if isinstance(result, str) else json.dumps(result)).encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self):
            self._reply("GET")

        def do_POST(self):
            self._reply("POST")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def start_standins(registry: dict, **knobs):
    """A replacement for r1mega.rollout.sglang.launch.start_servers: stand-ins in this process. `knobs` are
    set on each (hold, die_at)."""
    import torch.distributed as dist

    from r1mega.rollout.sglang.launch import server_args, share_urls

    def start(cfg, topo):
        use_stub_metadata()
        mine = {}
        for e in topo.owned_engines(dist.get_rank()):
            standin = StandIn(cfg.model, topo.tp, seed=100 + e, server_args=server_args(cfg))
            standin.__dict__.update(knobs)
            server = serve(standin)
            registry[e] = standin
            mine[e] = f"http://127.0.0.1:{server.server_address[1]}"
        return share_urls(mine, topo.num_engines), []

    return start
