"""How a weight bucket reaches the engines.

IpcTransport (colocated): each rank of an engine's GPU block packs the bucket on its own GPU and
serializes it as a CUDA IPC handle; the block's first rank sends the handles, entry i to engine
TP rank i, so every engine rank reads its copy from its own GPU (SGLang's flattened_bucket).
NcclTransport (disaggregated): rank 0 broadcasts each packed bucket over an NCCL group it shares
with every engine GPU (update_weights_from_distributed).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Optional

import torch
import torch.distributed as dist

from r1mega.platform.distributed import collectively
from r1mega.rollout.sglang.buckets import Named, pack, serialize
from r1mega.rollout.sglang.client import SGLangClient
from r1mega.rollout.sglang.topology import Topology


class IpcTransport:
    def __init__(self, topology: Topology, clients: List[SGLangClient]):
        self.topology = topology
        self.clients = clients
        rank = dist.get_rank()
        self.engine = rank // topology.tp
        self.owner = topology.owner(self.engine)
        self.group = None  # this block's gloo group (object gathers stay off NCCL)
        for e in range(topology.num_engines):
            ranks = list(range(topology.owner(e), topology.owner(e) + topology.tp))
            g = dist.new_group(ranks, backend="gloo") if topology.tp > 1 else None
            if e == self.engine:
                self.group = g

    def send(self, bucket: List[Named], version: str) -> None:
        buffer, meta = pack(bucket)
        payload = serialize({"flattened_tensor": buffer, "metadata": meta})
        payloads = [payload]
        if self.group is not None:
            payloads = [None] * self.topology.tp
            dist.gather_object(payload, payloads if dist.get_rank() == self.owner else None,
                               dst=self.owner, group=self.group)
        # collective, so a refused bucket raises on every rank. Each bucket is a fresh buffer, never
        # overwritten; torch's CUDA IPC ref counting keeps its memory from reuse while the engine
        # holds it, and finish() collects what the engines have let go.
        with collectively():
            if dist.get_rank() == self.owner:
                self.clients[self.engine].update_weights_from_tensor(payloads, "flattened_bucket", version)

    def finish(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.ipc_collect()

    def close(self) -> None:
        pass


class NcclTransport:
    """Rank 0 is rank 0 of an NCCL group whose other ranks are the engines' GPUs (rank_offset 1)."""

    GROUP = "r1mega-weights"

    def __init__(self, topology: Topology, clients: List[SGLangClient], master_address: str, master_port: int,
                 init_group: Optional[Callable] = None):
        self.topology = topology
        self.clients = clients
        self.group = None
        if dist.get_rank() != 0:
            return
        world = 1 + topology.num_engines * topology.tp
        init_group = init_group or _sglang_init_group
        with ThreadPoolExecutor(len(clients)) as pool:  # each join blocks until all members arrive
            joins = [pool.submit(c.init_weights_update_group, master_address, master_port, 1 + e * topology.tp,
                                 world, self.GROUP) for e, c in enumerate(clients)]
            self.group = init_group(master_address, master_port, world, self.GROUP)
            for j in joins:
                j.result()

    def send(self, bucket: List[Named], version: str) -> None:
        if self.group is None:
            return
        buffer, meta = pack(bucket)
        names = [m.name for m in meta]
        dtypes = [str(m.dtype).replace("torch.", "") for m in meta]
        shapes = [list(m.shape) for m in meta]
        with ThreadPoolExecutor(len(self.clients)) as pool:  # the servers wait in the broadcast
            calls = [pool.submit(c.update_weights_from_distributed, names, dtypes, shapes, self.GROUP, version)
                     for c in self.clients]
            options = dist.BroadcastOptions()  # the group's own call: SGLang's helper group and a plain one alike
            options.rootRank, options.rootTensor = 0, 0
            self.group.broadcast([buffer], options).wait()
            for call in calls:
                call.result()

    def finish(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def close(self) -> None:
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None


def _sglang_init_group(master_address: str, master_port: int, world_size: int, group_name: str):
    # the same rendezvous the servers use to join (sglang.srt.utils.init_custom_process_group)
    from sglang.srt.utils import init_custom_process_group

    return init_custom_process_group(backend="nccl", init_method=f"tcp://{master_address}:{master_port}",
                                     world_size=world_size, rank=0, group_name=group_name)
