"""The weight-push protocol between the trainer and its rollout workers (r1mega/rollout/weights.py),
each in a process of its own: pushes arrive whole and in order; a worker lost halfway through a
push (it stopped reading, then was killed) is regrouped away, and the other worker ends with the
newest weights, while the sender reports no error."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from r1mega.platform.env import free_port

pytestmark = pytest.mark.distributed

BIG = 16 << 20  # floats: a push no socket buffer holds, so the sender waits for a reader


def _tensors(version: int, n: int = 8) -> dict:
    return {"w": torch.full((n,), float(version)), "b": torch.arange(3, dtype=torch.int64) * version}


def _sender(port: int, orders, results):
    from r1mega.platform.bridge import Bridge
    from r1mega.rollout.weights import Pusher

    pusher = Pusher(Bridge("127.0.0.1", port, 0, 3, timeout_s=300), timeout_s=300)
    pusher.start()
    while True:
        order = orders.get(timeout=300)
        if order == "stop":
            break
        if order[0] == "push":
            pusher.push(order[1], _tensors(order[1], order[2]))
        else:
            pusher.regroup(order[1])
    results.put(("sender", repr(pusher.error)))
    pusher.stop()


def _receiver(port: int, index: int, stall_after: int, results):
    import time

    from r1mega.platform.bridge import Bridge
    from r1mega.rollout.weights import Receiver

    def load(version, tensors):
        results.put(("loaded", index, version, float(tensors["w"][0]), int(tensors["w"].numel()),
                     tensors["b"].tolist()))

    receiver = Receiver(Bridge("127.0.0.1", port, index + 1, 3, timeout_s=300), index, load, 300.0, lambda: None)
    while True:
        receiver.poll()
        if stall_after and receiver.received >= stall_after:  # stops reading: pushes after this one wait on it
            results.put(("stalled", index))
            time.sleep(3600)
        time.sleep(0.01)


def test_a_worker_lost_halfway_through_a_push_is_regrouped_away():
    ctx = mp.get_context("spawn")
    # a queue per process: one killed while writing may leave a shared queue's lock held
    orders, from_sender, from_lost, from_kept = ctx.Queue(), ctx.Queue(), ctx.Queue(), ctx.Queue()
    port = free_port()
    sender = ctx.Process(target=_sender, args=(port, orders, from_sender))
    # worker 0 (bridge rank 1, the first the sender sends to) stops reading after the first push
    lost = ctx.Process(target=_receiver, args=(port, 0, 1, from_lost))
    kept = ctx.Process(target=_receiver, args=(port, 1, 0, from_kept))
    for p in (sender, lost, kept):
        p.start()
    try:
        orders.put(("push", 1, 8))
        assert from_lost.get(timeout=120)[:4] == ("loaded", 0, 1, 1.0)
        assert from_lost.get(timeout=120) == ("stalled", 0)
        assert from_kept.get(timeout=120)[:4] == ("loaded", 1, 1, 1.0)
        orders.put(("push", 2, BIG))  # worker 0 never reads it
        lost.kill()
        lost.join(timeout=30)
        orders.put(("regroup", [1]))
        got = from_kept.get(timeout=120)  # worker 1 may have had the first try of push 2 whole, then the resend
        assert got == ("loaded", 1, 2, 2.0, BIG, [0, 2, 4])
        orders.put(("push", 3, 8))  # the regrouped bridge goes on
        got = from_kept.get(timeout=120)
        while got[2] != 3:
            assert got == ("loaded", 1, 2, 2.0, BIG, [0, 2, 4])
            got = from_kept.get(timeout=120)
        assert got == ("loaded", 1, 3, 3.0, 8, [0, 3, 6])
        orders.put("stop")
        assert from_sender.get(timeout=120) == ("sender", "None")
    finally:
        for p in (sender, lost, kept):
            if p.is_alive():
                p.kill()
