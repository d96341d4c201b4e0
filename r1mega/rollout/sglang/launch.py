"""Building the SGLang engine of an RL run: topology, servers, transport."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist

from r1mega.checkpoint.hf_config import hf_config_from_model
from r1mega.config.schema import R1Config
from r1mega.platform.distributed import collectively
from r1mega.rollout.sglang.client import SGLangClient
from r1mega.rollout.sglang.engine import SGLangEngine
from r1mega.rollout.sglang.server import ServerProcess, check_version, server_command, write_model_dir
from r1mega.rollout.sglang.topology import Topology
from r1mega.rollout.sglang.transport import IpcTransport, NcclTransport

log = logging.getLogger(__name__)


def topology(cfg: R1Config) -> Topology:
    g = cfg.rollout.sglang
    world = dist.get_world_size()
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE")
                   or min(world, torch.cuda.device_count() or world))
    return Topology(g.mode, g.tp, world, per_node, g.base_gpu_id, g.num_gpus or 0)


def start_servers(cfg: R1Config, topo: Topology) -> Tuple[List[str], List[ServerProcess]]:
    """Owners launch their engines; every rank gets every engine's URL (collective; a server that
    fails to start raises on every rank)."""
    g = cfg.rollout.sglang
    folder = Path(g.log_dir or Path(cfg.trainer.output_dir) / "sglang")
    # engines on several nodes serve on every interface, under this node's name
    bind = "0.0.0.0" if topo.world_size > topo.ranks_per_node else g.host
    host = socket.gethostname() if bind == "0.0.0.0" else bind
    procs, mine = [], {}
    with collectively():
        if not torch.cuda.is_available():
            raise RuntimeError("rollout.engine=sglang needs CUDA GPUs; use rollout=native on this machine")
        check_version()
        for e in topo.owned_engines(dist.get_rank()):
            port = g.port + e
            model_dir = write_model_dir(folder / f"model-{e}", hf_config_from_model(cfg.model))
            cmd = server_command(model_dir, g, topo.engine_gpu(e), bind, port, cfg.model.dtype, cfg.trainer.seed + e,
                                 memory_saver(cfg), server_args(cfg))
            procs.append(ServerProcess(cmd, folder / f"engine-{e}.log", f"http://{host}:{port}", g.request_timeout_s))
            mine[e] = procs[-1].client.url
        for p in procs:  # started together, waited on together
            p.wait_ready(g.startup_timeout_s)
            log.info("sglang engine ready at %s (sglang %s)", p.client.url, p.client.server_version())
    return share_urls(mine, topo.num_engines), procs


def server_args(cfg: R1Config) -> dict:
    """rollout.sglang.server_args, and the flags r1mega's own settings need: routing replay of the rollout's
    routing (algorithm.routing_replay=rollout) needs the routed experts returned."""
    args = dict(cfg.rollout.sglang.server_args)
    if cfg.algorithm.routing_replay == "rollout":
        args["enable_return_routed_experts"] = True
    return args


def share_urls(mine: Dict[int, str], num_engines: int) -> List[str]:
    """Every engine's URL on every rank, from the URLs of the engines each rank launched (collective)."""
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    urls = {e: u for part in every for e, u in part.items()}
    return [urls[e] for e in range(num_engines)]


def memory_saver(cfg: R1Config) -> bool:
    """Whether engines release and resume memory: colocated engines with the memory saver on."""
    g = cfg.rollout.sglang
    return g.enable_memory_saver and g.mode == "colocated"


def stop_token_ids(cfg: R1Config, tokenizer) -> List[int]:
    """EOS plus rollout.stop strings, each of which must be one token (servers run without a tokenizer)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for text in cfg.rollout.stop:
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            raise ValueError(f"rollout.stop entry {text!r} is {len(tokens)} tokens; with rollout.engine=sglang "
                             "(servers without a tokenizer) each stop string must be a single token")
        ids.append(tokens[0])
    return ids


def build_sglang_engine(cfg: R1Config, tokenizer) -> SGLangEngine:
    """Servers up, transport connected: an engine ready for its first weight sync."""
    g = cfg.rollout.sglang
    topo = topology(cfg)
    urls, procs = start_servers(cfg, topo)
    clients = [SGLangClient(u, g.request_timeout_s) for u in urls]
    if g.mode == "colocated":
        transport = IpcTransport(topo, clients)
    else:
        transport = NcclTransport(topo, clients, socket.gethostname(), g.nccl_port)
    return SGLangEngine(topo, clients, transport, stop_token_ids(cfg, tokenizer), int(g.bucket_mb * 2**20),
                        memory_saver=memory_saver(cfg), processes=procs,
                        weights_backup=server_flag(g, "enable_weights_cpu_backup"), seed=cfg.trainer.seed)


def server_flag(g, name: str) -> bool:
    """Whether rollout.sglang.server_args turns the launch_server flag `name` on (either spelling)."""
    return any(str(key).replace("-", "_") == name and bool(value) for key, value in g.server_args.items())
