"""What a run directory (``--save_dir``) holds, and the rules that keep two runs' files apart.

A directory *holds a run* when it has a checkpoint (``latest`` or a ``global_stepN``) or a
``metrics.jsonl`` with steps in it. Such a directory is continued with ``--resume`` (after its
recorded configs are checked against this launch's) or replaced with ``--replace_run`` (its run's
files are first moved into ``replaced/TIMESTAMP/``); a plain start into it is refused, so an old
run's checkpoints, ``latest`` and metrics are never overwritten or mixed with a new run's.

While a run trains, rank 0 holds ``run.lock``: created with a hard link (atomic on NFS and Lustre,
where ``flock`` may not be), naming the host, pid and Slurm job, and refreshed every
``LOCK_HEARTBEAT_S``. A second launch into the directory is refused with the holder named. A lock
whose holder is gone (its pid no longer runs on this host, an earlier attempt of this Slurm job, or
no heartbeat for ``LOCK_STALE_AFTER_S``) is named in a warning and taken over.
"""
import datetime
import json
import os
import re
import socket
import threading
import time

from switchyard.errors import ConfigError

RUN_CONFIG = "run_config.json"
METRICS = "metrics.jsonl"
LATEST = "latest"
MANIFEST = "manifest.json"
LOCK = "run.lock"
REPLACED = "replaced"
TAG = re.compile(r"^global_step(\d+)$")
# What a run writes at the top of its directory (DeepSpeed adds its zero_to_*.py converters beside the
# checkpoints); --replace_run moves exactly these. Anything else (a tokenizer copied in, slurm/ job
# records, earlier replaced/ runs) stays where it is.
RUN_FILE = re.compile(r"^(global_step\d+(\.partial|_universal)?|latest(_universal)?|metrics\.jsonl|run_config\.json|wandb"
                      r"|zero_to_fp32\.py|zero_to_torch\.py)$")
# The lock's clock: a holder refreshes it every LOCK_HEARTBEAT_S; one silent for LOCK_STALE_AFTER_S is
# gone (ten missed beats: a loaded metadata server can delay a few, never ten).
LOCK_HEARTBEAT_S = 30.0
LOCK_STALE_AFTER_S = 300.0


def complete_tags(save_dir):
    """Renamed (complete) checkpoint tags, newest first."""
    if not os.path.isdir(save_dir):
        return []
    tags = [name for name in os.listdir(save_dir) if TAG.match(name) and os.path.isdir(os.path.join(save_dir, name))]
    return sorted(tags, key=lambda name: int(TAG.match(name).group(1)), reverse=True)


def metrics_steps(save_dir):
    """The last step metrics.jsonl records, or None when it records none."""
    last = None
    try:
        with open(os.path.join(save_dir, METRICS)) as f:
            for line in f:
                try:
                    step = json.loads(line).get("step")
                except (ValueError, AttributeError):
                    continue  # a line cut by a kill
                if isinstance(step, int):
                    last = step if last is None else max(last, step)
    except OSError:
        return None
    return last


def what_run_it_holds(save_dir):
    """A short description of the run ``save_dir`` holds, or None when it holds none."""
    held = []
    tags = complete_tags(save_dir)
    if tags:
        held.append(f"checkpoints {', '.join(tags[:3])}{', ...' if len(tags) > 3 else ''}")
    elif os.path.isfile(os.path.join(save_dir, LATEST)):
        held.append(f"a '{LATEST}' pointer")
    step = metrics_steps(save_dir)
    if step is not None:
        held.append(f"metrics to step {step}")
    return " and ".join(held) or None


def read_latest(save_dir):
    """The tag ``latest`` names; a ConfigError when it is not a checkpoint's tag (damaged, hand-edited)."""
    path = os.path.join(save_dir, LATEST)
    with open(path, "rb") as f:
        raw = f.read(256)
    tag = raw.decode("utf-8", errors="replace").strip()
    if not TAG.match(tag):
        found = complete_tags(save_dir)
        raise ConfigError(f"{path} does not name a checkpoint (it holds {raw[:40]!r}); "
                          + (f"write the tag of the one to resume from into it, e.g. echo {found[0]} > {path}" if found
                             else f"{save_dir} has no complete checkpoint to resume from"))
    return tag


def check_save_dir(save_dir):
    """--save_dir must be a directory, or creatable: checked before anything is written."""
    if os.path.exists(save_dir) and not os.path.isdir(save_dir):
        raise ConfigError(f"--save_dir {save_dir} is a file, not a directory; pass a directory for the run")
    parent = os.path.abspath(save_dir)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"--save_dir {save_dir} cannot be created: {parent} is a file; pass another --save_dir")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--save_dir {save_dir} cannot be {'written' if parent == os.path.abspath(save_dir) else 'created'}: "
                          f"no write permission on {parent}; pass a --save_dir you can write")


def check_start(save_dir, resume, replace_run):
    """The one rule for how a launch may use ``save_dir``; returns the tag to resume from (None: a fresh start)."""
    check_save_dir(save_dir)
    if resume and replace_run:
        raise ConfigError("--resume continues the run in --save_dir and --replace_run replaces it; pass one of them")
    held = what_run_it_holds(save_dir)
    if not resume:
        if held and not replace_run:
            raise ConfigError(f"--save_dir {save_dir} already holds a run ({held}); pass --resume to continue it, "
                              f"--replace_run to move it into {os.path.join(save_dir, REPLACED)}/ and start over, "
                              f"or a new --save_dir")
        return None
    if os.path.isfile(os.path.join(save_dir, LATEST)):
        return read_latest(save_dir)
    tags = complete_tags(save_dir)
    if tags:  # the pointer is gone but checkpoints are not: starting over would be the overwrite refused above
        raise ConfigError(f"--resume: {save_dir} has no '{LATEST}' pointer but holds checkpoints {', '.join(tags)}; "
                          f"to resume from the newest, run: echo {tags[0]} > {os.path.join(save_dir, LATEST)}")
    if held:
        raise ConfigError(f"--resume: {save_dir} holds a run that saved no checkpoint ({held}); nothing to resume from: "
                          f"pass --replace_run instead of --resume to start it over, or a new --save_dir")
    raise ConfigError(f"--resume given but {save_dir} holds no checkpoint ('{LATEST}' is missing); drop --resume to start fresh")


def read_run_config(save_dir):
    """The run's recorded configs (run_config.json), or None when it has none."""
    path = os.path.join(save_dir, RUN_CONFIG)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); restore it from the run's slurm/ records or a backup")


def write_run_config(save_dir, record):
    """run_config.json, replaced atomically: a kill never leaves half a record."""
    path = os.path.join(save_dir, RUN_CONFIG)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def move_run_aside(save_dir):
    """Move the run ``save_dir`` holds into ``replaced/TIMESTAMP/`` (returned); nothing of it is deleted."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = os.path.join(save_dir, REPLACED, stamp)
    suffix = 0
    while os.path.exists(target):
        suffix += 1
        target = os.path.join(save_dir, REPLACED, f"{stamp}-{suffix}")
    os.makedirs(target)
    for name in sorted(os.listdir(save_dir)):
        if RUN_FILE.match(name):
            os.rename(os.path.join(save_dir, name), os.path.join(target, name))
    return target


def _pid_start_time(pid):
    """The process's start time in clock ticks since boot (Linux), so a reused pid is not taken for its holder."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _pid_runs(pid, start_time):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it runs
    return start_time is None or _pid_start_time(pid) in (None, start_time)


class RunLock:
    """rank 0's claim on a run directory (module docstring); ``acquire`` raises ConfigError naming a live holder."""

    def __init__(self, save_dir):
        self.save_dir = save_dir
        self.path = os.path.join(save_dir, LOCK)
        self.identity = {
            "host": socket.gethostname(), "pid": os.getpid(), "pid_start": _pid_start_time(os.getpid()),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "token": f"{socket.gethostname()}.{os.getpid()}.{time.time_ns()}",
        }
        self._stop = threading.Event()
        self._heartbeat = None

    def _holder(self):
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # being written, or damaged: judged by its age alone

    def _filesystem_now(self):
        """Now, by the clock that stamps this filesystem's mtimes (an NFS server's, not this host's)."""
        probe = os.path.join(self.save_dir, f".{LOCK}.clock.{self.identity['token']}")
        with open(probe, "w"):
            pass
        try:
            return os.stat(probe).st_mtime
        finally:
            os.unlink(probe)

    def _why_gone(self, holder, age):
        """Why the holder of the lock no longer runs, or None while it may."""
        if holder.get("slurm_job_id") and holder.get("slurm_job_id") == self.identity["slurm_job_id"] \
                and holder.get("slurm_restart", 0) < self.identity["slurm_restart"]:
            return f"it was attempt {holder.get('slurm_restart', 0)} of this Slurm job, now requeued"
        if holder.get("host") == self.identity["host"] and isinstance(holder.get("pid"), int) \
                and not _pid_runs(holder["pid"], holder.get("pid_start")):
            return f"pid {holder['pid']} no longer runs on this host"
        if age > LOCK_STALE_AFTER_S:
            return f"no heartbeat for {age:.0f} s"
        return None

    def _try_link(self):
        """One attempt to create the lock; True when it is ours. link() fails if the name exists, atomically on
        NFS too; a link count of 2 afterwards means it succeeded even if the server's reply was lost."""
        tmp = os.path.join(self.save_dir, f".{LOCK}.{self.identity['token']}")
        with open(tmp, "w") as f:
            json.dump(self.identity, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            pass
        except OSError:
            pass  # judged by the link count below
        try:
            return os.stat(tmp).st_nlink == 2
        finally:
            os.unlink(tmp)

    def acquire(self, attempts=3):
        os.makedirs(self.save_dir, exist_ok=True)
        for _ in range(attempts):
            if self._try_link():
                self._start_heartbeat()
                return self
            holder = self._holder()
            if holder is None:
                continue  # released in between
            try:
                age = self._filesystem_now() - os.stat(self.path).st_mtime
            except FileNotFoundError:
                continue
            why = self._why_gone(holder, age)
            if why is None:
                raise ConfigError(
                    f"--save_dir {self.save_dir} is in use by another run (host {holder.get('host')}, pid {holder.get('pid')}"
                    f"{', Slurm job ' + holder['slurm_job_id'] if holder.get('slurm_job_id') else ''}, started "
                    f"{holder.get('started')}, last heartbeat {age:.0f} s ago); wait for it to end or pass another --save_dir")
            stale = f"{self.path}.stale.{self.identity['token']}"
            try:
                os.rename(self.path, stale)  # only one of several contenders wins the rename
            except FileNotFoundError:
                continue
            os.unlink(stale)
            print(f"warning: {self.path} was left by a run that is gone (host {holder.get('host')}, pid {holder.get('pid')}, "
                  f"started {holder.get('started')}: {why}); taking it over", flush=True)
        raise ConfigError(f"could not take {self.path} after {attempts} attempts (other launches are contending for it); "
                          f"start one run per --save_dir")

    def _start_heartbeat(self):
        def beat():
            while not self._stop.wait(LOCK_HEARTBEAT_S):
                try:
                    os.utime(self.path)
                except OSError:
                    pass  # a filesystem hiccup: the next beat tries again
        self._heartbeat = threading.Thread(target=beat, name="run-lock-heartbeat", daemon=True)
        self._heartbeat.start()

    def release(self):
        """Remove the lock if it is still ours (a run that lost it to a takeover leaves the new holder's alone)."""
        self._stop.set()
        holder = self._holder()
        if holder and holder.get("token") == self.identity["token"]:
            os.unlink(self.path)


def claim(save_dir, resume, replace_run):
    """Rank 0, once the process group is up: take the lock, then apply the start rule again under it (another
    run may have written here since every rank checked). Returns (lock, the replaced run's new home or None)."""
    lock = RunLock(save_dir).acquire()
    try:
        check_start(save_dir, resume, replace_run)
        moved = move_run_aside(save_dir) if replace_run and what_run_it_holds(save_dir) else None
    except BaseException:
        lock.release()
        raise
    return lock, moved


def _zero_stage(ds_config):
    return (ds_config.get("zero_optimization") or {}).get("stage", 0)


def _pipeline_stages(ds_config):
    stages = (ds_config.get("pipeline") or {}).get("stages", 1)
    return 1 if stages == "auto" else stages


def check_resume_compatible(save_dir, model_config, ds_config, tokenizers):
    """Refuse, before anything is written, a resume whose launch would not fit the weights the run saved; returns
    the notice (one line, or None) for changed training settings. ``tokenizers``: name -> spec, as the run records.

    Compared with what run_config.json recorded: the model config's weight fields (registry.TRAINING_SETTING
    marks the others), the ZeRO stage (DeepSpeed converts no checkpoint between stages), the pipeline
    stages (their layer files), and the tokenizers (the vocabulary behind the embeddings). The data-parallel
    and expert-parallel sizes are pretrain.ds_config.plan_resume's."""
    from models.registry import resume_differences

    recorded = read_run_config(save_dir)
    if recorded is None:  # a checkpoint copied in without its record: nothing to compare against
        return None
    where = os.path.join(save_dir, RUN_CONFIG)
    weights, settings = resume_differences(recorded.get("model", {}), model_config)
    if weights:
        changed = ", ".join(f"{name} {old!r} -> {new!r}" for name, old, new in weights)
        raise ConfigError(f"--resume: the model config changes what the saved weights are ({changed}, against {where}); "
                          f"resume with the run's own model config, or start a new run in another --save_dir")
    saved_ds = recorded.get("deepspeed", {})
    for what, old, new in (("ZeRO stage", _zero_stage(saved_ds), _zero_stage(ds_config)),
                           ("pipeline stages", _pipeline_stages(saved_ds), _pipeline_stages(ds_config))):
        if old != new:
            raise ConfigError(f"--resume: the run was saved with {what} {old} and this launch has {new}; no conversion "
                              f"between them exists: resume with a DeepSpeed config of {what} {old}")
    for name, spec in tokenizers.items():
        old = recorded.get(name)
        if old is not None and (old.get("type"), old.get("sha256")) != (spec.get("type"), spec.get("sha256")):
            raise ConfigError(f"--resume: the run was trained with {name} {old.get('path') or old.get('type')} and this launch "
                              f"uses {spec.get('path') or spec.get('type')}, another vocabulary; pass the run's own tokenizer")
    if settings:
        changed = ", ".join(f"{name} {old!r} -> {new!r}" for name, old, new in settings)
        return f"notice: resuming with changed training settings: {changed}"
    return None
