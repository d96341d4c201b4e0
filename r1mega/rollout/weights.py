"""How weights travel from the trainer to asynchronous rollout workers, both ends in one place.

The trainer's first rank and the workers share a bridge group (r1mega/platform/bridge.py) whose
store carries the protocol:

- `pushes` counts the pushes announced; `push-<i>` is the policy version push i carries. The
  sender announces a push, then broadcasts it; a worker joins every announced push in order.
- `epoch` counts regroupings; `epoch-<e>` names the workers that remain and how many pushes had
  been announced. When a worker is lost, the sender regroups the others into a new group (the
  old one held the lost member, and its collectives would fail or wait); each remaining worker
  follows, skips the pushes announced before (one may have failed halfway) and joins the next:
  the sender sends its newest weights again.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Callable, List, Optional, Tuple

from r1mega.platform.bridge import Bridge

log = logging.getLogger(__name__)

PUSHES, EPOCH = "pushes", "epoch"


def push_key(i: int) -> str:
    return f"push-{i}"


def epoch_key(e: int) -> str:
    return f"epoch-{e}"


class Pusher(threading.Thread):
    """The trainer's sending side, a thread of the first rank: sends weight snapshots, newest first
    (a snapshot still waiting when a newer one comes is replaced), and regroups the bridge when the
    controller reports a lost worker. Every bridge collective of the trainer happens here."""

    def __init__(self, bridge: Bridge, timeout_s: float):
        super().__init__(name="r1mega-weight-push", daemon=True)
        self.bridge, self.timeout_s = bridge, timeout_s
        self.cond = threading.Condition()
        self.waiting: Optional[Tuple[int, dict]] = None
        self.last: Optional[Tuple[int, dict]] = None  # the newest snapshot sent: sent again after a regroup
        self.members: Optional[List[int]] = None  # a regroup asked for: the workers that remain
        self.announced = -1  # the newest version workers were told of
        self.sent = 0
        self.error: Optional[BaseException] = None
        self.stopping = False

    def push(self, version: int, tensors: dict) -> None:
        with self.cond:
            self.waiting = (version, tensors)
            self.cond.notify()

    def regroup(self, members: List[int]) -> None:
        with self.cond:
            self.members = list(members)
            self.cond.notify()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()

    def run(self) -> None:
        try:
            while self._next():
                pass
        except BaseException as e:  # the controller reports it at its next check
            self.error = e

    def _next(self) -> bool:
        with self.cond:
            while self.waiting is None and self.members is None and not self.stopping:
                self.cond.wait()
            if self.stopping:
                return False
            members, item = self.members, None
            if members is None:
                item, self.waiting = self.waiting, None
            self.members = None
        if members is not None:
            self._regroup(members)
            return True
        try:
            self._send(*item)
        except Exception as e:  # a member may have gone halfway: wait for the controller to regroup the rest
            log.warning("weight push failed (%s); waiting for the rollout workers to regroup", e)
            with self.cond:
                if not self.cond.wait_for(lambda: self.members is not None or self.stopping, self.timeout_s):
                    raise
        return True

    def _send(self, version: int, tensors: dict) -> None:
        self.sent += 1
        self.last = (version, tensors)
        self.bridge.store.set(push_key(self.sent), str(version))
        self.bridge.store.add(PUSHES, 1)
        self.announced = version
        self.bridge.broadcast_named(tensors)

    def _regroup(self, members: List[int]) -> None:
        epoch = self.bridge.epoch + 1
        self.bridge.store.set(epoch_key(epoch), json.dumps({"members": members, "pushes": self.sent}))
        self.bridge.store.add(EPOCH, 1)
        self.bridge.rebuild(0, len(members) + 1, epoch)
        with self.cond:
            if self.waiting is None and self.last is not None:  # the newest weights, to every member
                self.waiting = self.last


class Receiver:
    """A worker's receiving side: joins every announced push, in order, and follows regroupings."""

    def __init__(self, bridge: Bridge, index: int, load: Callable[[int, dict], None], timeout_s: float,
                 beat: Callable[[], None]):
        self.bridge, self.index, self.load, self.timeout_s, self.beat = bridge, index, load, timeout_s, beat
        self.received = 0

    def poll(self) -> bool:
        """Join the pushes announced and not yet received; True when any arrived."""
        got = False
        while True:
            self._follow_epoch()
            if self.received >= self.bridge.store.add(PUSHES, 0):
                return got
            version = int(self.bridge.store.get(push_key(self.received + 1)))
            try:
                tensors = self.bridge.broadcast_named(None)
            except Exception:  # a member went halfway through: the trainer regroups the rest
                self._await_regroup()
                continue
            self.load(version, tensors)
            self.received += 1
            got = True
            self.beat()

    def _follow_epoch(self) -> None:
        epoch = self.bridge.store.add(EPOCH, 0)
        if epoch == self.bridge.epoch:
            return
        record = json.loads(self.bridge.store.get(epoch_key(epoch)))
        if self.index not in record["members"]:
            raise SystemExit(f"rollout worker {self.index}: the trainer went on without this worker")
        self.bridge.rebuild(record["members"].index(self.index) + 1, len(record["members"]) + 1, epoch)
        self.received = record["pushes"]

    def _await_regroup(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while self.bridge.store.add(EPOCH, 0) == self.bridge.epoch:
            if time.monotonic() > deadline:
                raise RuntimeError(f"a weight push failed and the trainer did not regroup within {self.timeout_s:g} s")
            self.beat()
            time.sleep(0.05)
