"""No rank waits forever for one that stopped: a frozen, killed or failed rank ends the whole job, named.

Two bounds, each a flag of pretrain/main.py:

- ``--distributed_timeout_minutes`` (pretrain/distributed.py) bounds every collective, gloo and NCCL. It
  must outlast what one rank legitimately does alone while the others wait in one (an op's first JIT
  build at start, a validation), so it is long. Checkpoint work of unknown length is not waited for in a
  collective (below).
- ``--heartbeat_timeout_s`` (here) catches the ranks that stop without failing: frozen (SIGSTOP, a
  stuck filesystem), killed by the kernel, or on a lost host. Each rank's watchdog thread beats in the
  rendezvous store every few seconds and watches the next rank's beat (a ring, so the store's load
  grows with the world size, not its square). A busy rank still beats (the thread runs beside any
  work, hashing and collectives included), so this bound can be short. A watcher that sees its
  neighbour silent that long posts the failure; every rank's watchdog reads it within a beat, prints
  one line naming the rank and ends its process with EXIT_PEER_FAILED.

A rank that fails with an exception posts it too (``post_failure``), so the others end at once instead
of waiting in their next collective for the bound. A rendezvous store that stops answering (it lives
in rank 0's process, or in torchrun's agent) ends the rank the same way.

Where ranks wait for work of unknown length that one rank does alone (rank 0 hashing and renaming a
checkpoint, converting one to DeepSpeed's universal format; a rank writing its larger shards), they wait in
the store instead of a collective (``rank0_alone``, ``barrier_in_store``): the collective bound, NCCL's
timeout on a GPU, would end a job whose rank 0 is only busy, and the heartbeat already bounds a rank
that stops.
"""

import itertools
import os
import pickle
import sys
import threading
import time

import psutil
import torch.distributed as dist

from pretrain.distributed import exit_now

EXIT_PEER_FAILED = 4  # another rank stopped answering or failed; the line on stderr names it
FAILURE_KEY = "failure"
ACKS_KEY = "failure_read_by"  # how many ranks have read the posted failure


def _store():
    # torch keeps the rendezvous store of the default group private; it is what every rank can reach
    # without a collective, which is the point here.
    return dist.distributed_c10d._get_default_store()


_running = None  # this process's started Watchdog: the store waits below are bounded by its heartbeats
_waits = itertools.count()  # every rank makes the same store waits in the same order: their keys match


def _wait_for(store, done):
    """Poll ``done()`` (a few store requests) until it holds, from every 50 ms up to every second: a long wait
    costs the store one request per rank per second."""
    pause = 0.05
    while not done():
        time.sleep(pause)
        pause = min(1.0, pause * 2)


def rank0_alone(work):
    """``work()`` run on rank 0 alone; its result (picklable) returned on every rank.

    While a watchdog runs, the other ranks wait in the rendezvous store, for as long as rank 0 works: a rank 0
    that stops or fails ends them as any stopped or failed rank does (its exception is posted; the others
    never see a result). Without one (a world of one, or a caller that started none), a broadcast."""
    if dist.get_world_size() == 1 or _running is None:
        result = [work() if dist.get_rank() == 0 else None]
        if dist.get_world_size() > 1:
            dist.broadcast_object_list(result, src=0)
        return result[0]
    store, key = _running.store, f"{_running.prefix}alone/{next(_waits)}"
    if dist.get_rank() == 0:
        result = work()
        store.set(key, pickle.dumps(result))
        _until_all_read(store, key)
        return result
    _wait_for(store, lambda: store.check([key]))
    result = pickle.loads(store.get(key))
    store.add(key + "/read", 1)
    return result


def _until_all_read(store, key):
    """Rank 0 goes on only once every rank has read ``key``: the store lives in its process (except under
    torchrun), and a rank 0 that went on and ended (a refusal every rank meets, say) would take the answer with it."""
    if dist.get_rank() == 0:
        _wait_for(store, lambda: store.add(key + "/read", 0) >= dist.get_world_size() - 1)


def barrier_in_store():
    """Every rank waits until all have arrived, in the store while a watchdog runs (as rank0_alone waits), so a
    rank whose own work before it takes long (writing its checkpoint shards) is bounded by its heartbeat, not
    the collective bound; else dist.barrier."""
    if dist.get_world_size() == 1 or _running is None:
        dist.barrier()
        return
    store, key = _running.store, f"{_running.prefix}barrier/{next(_waits)}"
    store.add(key, 1)
    _wait_for(store, lambda: store.add(key, 0) >= dist.get_world_size())
    if dist.get_rank() != 0:
        store.add(key + "/read", 1)
    _until_all_read(store, key)


class Watchdog:
    def __init__(self, heartbeat_timeout_s, before_exit=None):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.timeout = heartbeat_timeout_s
        self.interval = min(5.0, heartbeat_timeout_s / 4)
        self.before_exit = before_exit  # rank 0 releases the run directory's lock
        # Keys of this launch attempt only: torchrun's agent keeps its store across restarts.
        self.prefix = f"switchyard/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        self.store = _store()
        self.watched = (self.rank + 1) % self.world
        self.last_store_answer = time.monotonic()
        self._stopped = threading.Event()
        self._posted = False

    def start(self):
        global _running
        if self.world == 1:  # nobody to wait for
            return self
        _running = self
        for target in (self._beat_and_watch, self._watch_store):
            threading.Thread(target=target, name=f"watchdog-{target.__name__}", daemon=True).start()
        return self

    def stop(self):
        """The run has ended normally: the ranks leave one by one, and a silent neighbour is no failure now."""
        global _running
        self._stopped.set()
        _running = None

    def post_failure(self, message):
        """Tell every rank why the job ends (the first failure posted wins); they end within a beat. Waits (at most
        two beats) until they have read it: the store may live in this process and go with it."""
        if self.world == 1:
            return
        self._posted = True  # this rank ends by its own exception, not by reading its own post
        try:
            self.store.compare_set(self.prefix + FAILURE_KEY, "", message)
            deadline = time.monotonic() + 2 * self.interval
            while self.store.add(self.prefix + ACKS_KEY, 0) < self.world - 1 and time.monotonic() < deadline:
                time.sleep(0.1)
        except Exception:  # the store is gone too: the others' watchdogs find that themselves
            pass

    def posted_failure(self):
        """The failure another rank posted, or None: an error here that follows it (a collective whose peer has
        gone) is its consequence, not news."""
        if self.world == 1:
            return None
        try:
            if self.store.check([self.prefix + FAILURE_KEY]):
                return self.store.get(self.prefix + FAILURE_KEY).decode() or None
        except Exception:
            pass
        return None

    def end(self, message):
        """Print the one line naming why, release what this rank holds, and end the process with EXIT_PEER_FAILED."""
        if self._stopped.is_set():
            return
        print(f"error: rank {self.rank}: {message}; ending this rank (the last complete checkpoint is intact)", file=sys.stderr)
        if self.before_exit is not None:
            self.before_exit()
        exit_now(EXIT_PEER_FAILED)

    def _beat_and_watch(self):
        beats = 0
        seen, seen_at = None, time.monotonic()
        while not self._stopped.wait(self.interval):
            beats += 1
            key = f"{self.prefix}beat/{self.watched}"
            try:
                self.store.set(f"{self.prefix}beat/{self.rank}", str(beats))
                failure = None if self._posted else self.posted_failure()
                if failure:
                    self.store.add(self.prefix + ACKS_KEY, 1)
                    self.end(failure)
                beat = self.store.get(key) if self.store.check([key]) else None
            except Exception as e:  # the store's process has ended (a broken connection, not a slow one)
                if self._posted:  # this rank is ending by its own exception, which it posted: rank 0 read it and went
                    return
                self.end(
                    f"lost the rendezvous store (MASTER_ADDR {os.environ.get('MASTER_ADDR')}, port "
                    f"{os.environ.get('MASTER_PORT')}, served by rank 0's process or the launcher): "
                    f"{type(e).__name__}: {e}"
                )
            self.last_store_answer = time.monotonic()
            if beat != seen:
                seen, seen_at = beat, time.monotonic()
            elif time.monotonic() - seen_at > self.timeout:
                message = (
                    f"rank {self.watched} stopped answering (no heartbeat for {time.monotonic() - seen_at:.0f} s, "
                    f"--heartbeat_timeout_s {self.timeout:g}: frozen, killed, or its host lost)"
                )
                self.post_failure(message)
                self.end(message)

    def _watch_store(self):
        while not self._stopped.wait(self.interval):
            silent = time.monotonic() - self.last_store_answer
            if silent > self.timeout + self.interval and not self._posted:
                self.end(
                    f"the rendezvous store (MASTER_ADDR {os.environ.get('MASTER_ADDR')}, port "
                    f"{os.environ.get('MASTER_PORT')}, in rank 0's process or the launcher's) has not answered for "
                    f"{silent:.0f} s (--heartbeat_timeout_s {self.timeout:g})"
                )


def forward_runner_termination(on_terminated, interval_s=1.0):
    """Under the ``deepspeed`` launcher: when its runner process ends (SIGTERM sent to ``deepspeed`` alone), call
    ``on_terminated`` as a SIGTERM would, so the ranks save and exit 75 instead of training on, detached.

    The runner starts ``deepspeed.launcher.launch``, which starts the ranks; the runner forwards no signal on
    one node, and the launch process only notices its children. A rank therefore watches its grandparent:
    once the launch process is re-parented, the runner is gone. A no-op under torchrun, srun or plain python."""
    try:
        launch = psutil.Process(os.getppid())
        if "deepspeed.launcher.launch" not in " ".join(launch.cmdline()):
            return
        runner = launch.ppid()
    except psutil.Error:
        return

    def watch():
        while True:
            time.sleep(interval_s)
            try:
                if launch.ppid() == runner:
                    continue
            except psutil.Error:  # the launch process itself is gone
                pass
            on_terminated()
            return

    threading.Thread(target=watch, name="deepspeed-runner-watch", daemon=True).start()
