"""HTTP client of one SGLang server (routes and bodies of sglang 0.5.21-0.5.23's http_server.py).

Every call raises SGLangError naming the server and the route when the server refuses it, so a
failed weight update never passes silently.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any, Dict, List, Optional, Sequence

ALL_TAGS = ("weights", "kv_cache", "cuda_graph")  # sglang.srt.constants.GPU_MEMORY_TYPE_*


class SGLangError(RuntimeError):
    """A refused or failed request to an SGLang server."""


class SGLangClient:
    def __init__(self, url: str, timeout_s: float = 3600.0):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    # -- transport ---------------------------------------------------------------------------

    def request(self, route: str, body: Optional[dict] = None, method: str = "POST",
                timeout_s: Optional[float] = None) -> Any:
        """JSON body in, parsed JSON (or text) out; an HTTP error becomes SGLangError."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + route, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s or self.timeout_s) as resp:
                raw = resp.read().decode()
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:500]
            raise SGLangError(f"{self.url}{route}: HTTP {err.code}: {detail}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
            raise SGLangError(f"{self.url}{route}: {err}") from None
        try:
            return json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return raw  # /flush_cache answers in plain text

    def _checked(self, route: str, body: dict) -> dict:
        out = self.request(route, body)
        if not isinstance(out, dict) or not out.get("success", False):
            raise SGLangError(f"{self.url}{route} failed: {out}")
        return out

    # -- life cycle --------------------------------------------------------------------------

    def wait_ready(self, timeout_s: float, alive=lambda: True) -> None:
        """Poll /ready until the server serves; `alive` says whether its process still runs."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not alive():
                raise SGLangError(f"{self.url}: the server process exited during start-up (see its log)")
            try:
                self.request("/ready", method="GET", timeout_s=5)
                return
            except SGLangError:
                time.sleep(1.0)
        raise SGLangError(f"{self.url}: not ready after {timeout_s:.0f} s (rollout.sglang.startup_timeout_s)")

    def server_version(self) -> str:
        return str(self.request("/server_info", method="GET").get("version", "unknown"))

    # -- generation --------------------------------------------------------------------------

    def generate(self, input_ids: List[List[int]], sampling_params: Dict[str, Any] | List[Dict[str, Any]],
                 routed_experts: bool = False) -> List[dict]:
        """One output dict per sample, prompt-major (all n samples of prompt 0 first); sampling_params
        is one dict for every prompt, or a list with one per prompt. With routed_experts, each output's
        meta_info also has the experts every position was routed to (a server started with
        --enable-return-routed-experts)."""
        body = {"input_ids": input_ids, "sampling_params": sampling_params, "return_logprob": True,
                "logprob_start_len": -1, "stream": False}
        if routed_experts:
            body["return_routed_experts"] = True
        out = self.request("/generate", body)
        return out if isinstance(out, list) else [out]

    def prompt_logprobs(self, input_ids: List[List[int]], starts: List[int], top_k: int = 0) -> List[tuple]:
        """(log p(ids[j] | ids[:j]) for j = starts[i] .. len - 1, and with top_k the k most likely tokens' (log-prob,
        id) pairs at each of those positions, most likely first, else None) of each sequence, under the server's
        model, generating nothing. SGLang returns input log-probs (and top log-probs, aligned with them) from
        position logprob_start_len on, the first entry always None (that token's own log-prob is never
        computed), so each request starts one earlier; they are log-softmaxes of the raw logits (no
        temperature). max_new_tokens=0 makes a prefill-only request (no token sampled) when the whole batch
        is such requests."""
        if any(not 1 <= s < len(ids) for s, ids in zip(starts, input_ids)):
            raise ValueError("prompt_logprobs: every start must leave a token before it and one at it")
        body = {"input_ids": input_ids, "sampling_params": {"max_new_tokens": 0, "n": 1}, "return_logprob": True,
                "logprob_start_len": [s - 1 for s in starts], "stream": False}
        if top_k:
            body["top_logprobs_num"] = top_k
        out = self.request("/generate", body)
        out = out if isinstance(out, list) else [out]
        if len(out) != len(input_ids):
            raise SGLangError(f"{self.url}/generate: {len(out)} outputs for {len(input_ids)} sequences")
        values = []
        for i, (o, ids, s) in enumerate(zip(out, input_ids, starts)):
            meta = o.get("meta_info") or {}
            entries, want = meta.get("input_token_logprobs") or [], len(ids) - s
            if len(entries) != want + 1 or any(e[0] is None for e in entries[1:]):
                raise SGLangError(f"{self.url}/generate: sequence {i}: {len(entries)} input log-probs from "
                                  f"position {s - 1}, expected {want + 1} (the first None)")
            top = None
            if top_k:
                tops = meta.get("input_top_logprobs") or []
                if len(tops) != want + 1 or any(t is None or len(t) != top_k for t in tops[1:]):
                    raise SGLangError(f"{self.url}/generate: sequence {i}: input top log-probs missing or not "
                                      f"{top_k} per position")
                top = [sorted(((float(e[0]), int(e[1])) for e in t), key=lambda e: -e[0]) for t in tops[1:]]
            values.append(([float(e[0]) for e in entries[1:]], top))
        return values

    # -- memory and weights ------------------------------------------------------------------

    def release_memory(self, tags: Sequence[str] = ALL_TAGS) -> None:
        self.request("/release_memory_occupation", {"tags": list(tags)})

    def resume_memory(self, tags: Sequence[str] = ALL_TAGS) -> None:
        self.request("/resume_memory_occupation", {"tags": list(tags)})

    def flush_cache(self, attempts: int = 60) -> None:
        """Drop the prefix cache (refused while requests run, so retried)."""
        for _ in range(attempts - 1):
            try:
                self.request("/flush_cache", method="POST", timeout_s=30)
                return
            except SGLangError:
                time.sleep(1.0)
        self.request("/flush_cache", method="POST", timeout_s=30)

    def alive(self) -> None:
        """Raises unless the server answers /model_info within 5 s. (Not /health: in 0.5.23 that runs a
        one-token generation, which waits out every pause and weight update.)"""
        self.request("/model_info", method="GET", timeout_s=5)

    def pause_generation(self, mode: str) -> None:
        """Stop scheduling (abort: end every request; retract: free their KV, to be computed again under
        the weights current at /continue_generation; in_place: keep it). New /generate calls wait."""
        self.request("/pause_generation", {"mode": mode})

    def continue_generation(self) -> None:
        self.request("/continue_generation", {})

    def begin_weight_update(self) -> None:
        self._checked("/begin_weight_update", {"selector": "all"})

    def end_weight_update(self) -> None:
        self._checked("/end_weight_update", {})

    def update_weights_from_tensor(self, payloads: List[str], load_format: str, weight_version: str) -> None:
        """One base64 payload per engine TP rank (rank i reads entry i); the cache is flushed once at the end."""
        self._checked("/update_weights_from_tensor", {
            "serialized_named_tensors": payloads, "load_format": load_format, "flush_cache": False,
            "weight_version": weight_version})

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str) -> None:
        self._checked("/init_weights_update_group", {
            "master_address": master_address, "master_port": master_port, "rank_offset": rank_offset,
            "world_size": world_size, "group_name": group_name, "backend": "nccl"})

    def update_weights_from_distributed(self, names: List[str], dtypes: List[str], shapes: List[List[int]],
                                        group_name: str, weight_version: str) -> None:
        """The server receives one broadcast of a flattened bucket in exactly this layout."""
        self._checked("/update_weights_from_distributed", {
            "names": names, "dtypes": dtypes, "shapes": shapes, "group_name": group_name,
            "load_format": "flattened_bucket", "flush_cache": False, "weight_version": weight_version})
