"""Settings of the SGLang rollout engine (rollout.sglang): the few users change; the rest pass through."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Dict, Optional

from r1mega.config.choices import SGLangMode


@dataclass
class SGLangConfig:
    # colocated (engines on the trainer's GPUs) | disaggregated (on GPUs of their own)
    mode: Annotated[str, SGLangMode] = "colocated"
    tp: int = 1  # GPUs per engine (rollout tensor parallelism; may differ from parallel.tp)
    base_gpu_id: int = 0  # first GPU of this node's engines (disaggregated: usually after the trainer's)
    num_gpus: Optional[int] = None  # disaggregated: rollout GPUs on the first node (engines = num_gpus / tp)
    mem_fraction_static: float = 0.5  # of the GPU memory free at engine start (before the trainer's), for SGLang
    enable_memory_saver: bool = True  # colocated: release/resume weights, KV cache and CUDA graphs
    offload_optimizer: bool = True  # colocated: optimizer states to host memory while the engine runs
    offload_params: bool = False  # colocated: the trainer's parameters too (after each weight sync)
    bucket_mb: float = 512.0  # weight-sync bucket size (MiB)
    host: str = "127.0.0.1"  # engines bind here on one node; on several, every interface under the node's name
    port: int = 30000  # engine i serves on port + i (on its owner's node)
    nccl_port: int = 29650  # disaggregated: rendezvous of the weight-update group
    startup_timeout_s: float = 900.0
    request_timeout_s: float = 3600.0
    log_dir: Optional[str] = None  # engines' stdout/stderr; default <trainer.output_dir>/sglang
    server_args: Dict[str, Any] = field(default_factory=dict)  # more launch_server flags: {disable_cuda_graph: true}
