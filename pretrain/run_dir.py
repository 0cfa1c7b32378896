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

The checkpoints are written by pretrain/checkpoint.py (through the engine); reading them back as a plain
model, as evaluation, export and a distillation teacher do, is here (``load_model``), with the checks that
come first: the manifest, the allow-listed unpickler, the recorded tokenizer.
"""

import contextlib
import datetime
import enum
import hashlib
import json
import os
import pickle
import re
import socket
import sys
import threading
import time

import torch

from models import build_model, config_from_dict
from models.registry import check_architecture, family_of, without_launch_fields
from pretrain.data.tokenizer import ByteTokenizer, SentencePieceTokenizer
from switchyard import deepspeed_compat
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
RUN_FILE = re.compile(
    r"^(global_step\d+(\.partial|_universal)?|latest(_universal)?|metrics\.jsonl|run_config\.json|wandb"
    r"|zero_to_fp32\.py|zero_to_torch\.py)$"
)
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
        raise ConfigError(
            f"{path} does not name a checkpoint (it holds {raw[:40]!r}); "
            + (
                f"write the tag of the one to resume from into it, e.g. echo {found[0]} > {path}"
                if found
                else f"{save_dir} has no complete checkpoint to resume from"
            )
        )
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
        raise ConfigError(
            f"--save_dir {save_dir} cannot be {'written' if parent == os.path.abspath(save_dir) else 'created'}: "
            f"no write permission on {parent}; pass a --save_dir you can write"
        )


def check_start(save_dir, resume, replace_run):
    """The one rule for how a launch may use ``save_dir``; returns the tag to resume from (None: a fresh start)."""
    check_save_dir(save_dir)
    if resume and replace_run:
        raise ConfigError("--resume continues the run in --save_dir and --replace_run replaces it; pass one of them")
    held = what_run_it_holds(save_dir)
    if not resume:
        if held and not replace_run:
            raise ConfigError(
                f"--save_dir {save_dir} already holds a run ({held}); pass --resume to continue it, "
                f"--replace_run to move it into {os.path.join(save_dir, REPLACED)}/ and start over, "
                f"or a new --save_dir"
            )
        return None
    if os.path.isfile(os.path.join(save_dir, LATEST)):
        return read_latest(save_dir)
    tags = complete_tags(save_dir)
    if tags:  # the pointer is gone but checkpoints are not: starting over would be the overwrite refused above
        raise ConfigError(
            f"--resume: {save_dir} has no '{LATEST}' pointer but holds checkpoints {', '.join(tags)}; "
            f"to resume from the newest, run: echo {tags[0]} > {os.path.join(save_dir, LATEST)}"
        )
    if held:
        raise ConfigError(
            f"--resume: {save_dir} holds a run that saved no checkpoint ({held}); nothing to resume from: "
            f"pass --replace_run instead of --resume to start it over, or a new --save_dir"
        )
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
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_start": _pid_start_time(os.getpid()),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
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
        if (
            holder.get("slurm_job_id")
            and holder.get("slurm_job_id") == self.identity["slurm_job_id"]
            and holder.get("slurm_restart", 0) < self.identity["slurm_restart"]
        ):
            return f"it was attempt {holder.get('slurm_restart', 0)} of this Slurm job, now requeued"
        if (
            holder.get("host") == self.identity["host"]
            and isinstance(holder.get("pid"), int)
            and not _pid_runs(holder["pid"], holder.get("pid_start"))
        ):
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
                    f"{holder.get('started')}, last heartbeat {age:.0f} s ago); wait for it to end or pass another --save_dir"
                )
            stale = f"{self.path}.stale.{self.identity['token']}"
            try:
                os.rename(self.path, stale)  # only one of several contenders wins the rename
            except FileNotFoundError:
                continue
            os.unlink(stale)
            print(
                f"warning: {self.path} was left by a run that is gone (host {holder.get('host')}, pid {holder.get('pid')}, "
                f"started {holder.get('started')}: {why}); taking it over",
                flush=True,
            )
        raise ConfigError(
            f"could not take {self.path} after {attempts} attempts (other launches are contending for it); start one run per --save_dir"
        )

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

    check_experts_stacked(save_dir, model_config)
    recorded = read_run_config(save_dir)
    if recorded is None:  # a checkpoint copied in without its record: nothing to compare against
        return None
    where = os.path.join(save_dir, RUN_CONFIG)
    weights, settings = resume_differences(recorded.get("model", {}), model_config)
    if weights:
        changed = ", ".join(f"{name} {old!r} -> {new!r}" for name, old, new in weights)
        raise ConfigError(
            f"--resume: the model config changes what the saved weights are ({changed}, against {where}); "
            f"resume with the run's own model config, or start a new run in another --save_dir"
        )
    saved_ds = recorded.get("deepspeed", {})
    for what, old, new in (
        ("ZeRO stage", _zero_stage(saved_ds), _zero_stage(ds_config)),
        ("pipeline stages", _pipeline_stages(saved_ds), _pipeline_stages(ds_config)),
    ):
        if old != new:
            raise ConfigError(
                f"--resume: the run was saved with {what} {old} and this launch has {new}; no conversion "
                f"between them exists: resume with a DeepSpeed config of {what} {old}"
            )
    for name, spec in tokenizers.items():
        old = recorded.get(name)
        if old is not None and (old.get("type"), old.get("sha256")) != (spec.get("type"), spec.get("sha256")):
            raise ConfigError(
                f"--resume: the run was trained with {name} {old.get('path') or old.get('type')} and this launch "
                f"uses {spec.get('path') or spec.get('type')}, another vocabulary; pass the run's own tokenizer"
            )
    if settings:
        changed = ", ".join(f"{name} {old!r} -> {new!r}" for name, old, new in settings)
        return f"notice: resuming with changed training settings: {changed}"
    return None


def check_experts_stacked(save_dir, model_config):
    """Refuse to resume a model with experts from a checkpoint saved before its experts were stacked
    (models/switch.py GroupedExperts): its weights load, but DeepSpeed's optimizer state there is per expert
    parameter and does not fit the stacked ones (DeepSpeed stops with a traceback mid-load: torch's "different
    number of parameter groups" under ZeRO-0, a parameter-alignment layout mismatch under ZeRO-2). Such a
    checkpoint's expert files lack GroupedExperts.STACKED_KEY."""
    from models.switch import GroupedExperts

    tags = complete_tags(save_dir)
    if not family_of(model_config).experts or not tags:
        return
    path = deepspeed_compat.expert_checkpoint_path(save_dir, 0, 0, tags[0])  # every expert file is alike
    if os.path.isfile(path) and not any(key.endswith("." + GroupedExperts.STACKED_KEY) for key in safe_load(path, map_location="cpu")):
        raise ConfigError(
            f"--resume: {os.path.join(save_dir, tags[0])} was saved before Switchyard stacked each layer's experts, "
            f"and its optimizer state does not fit them; evaluate or export it as it is, or train a new run in another --save_dir"
        )


# Reading a run's checkpoints back. Whatever layout a run was trained in, the model comes back as the module
# models.build_model makes, whole on one process (evaluation, export and a distillation teacher read it so):
#
#     ZeRO 0-2            mp_rank_00_model_states.pt["module"]
#     experts (ZeRO 0-2)  + every expert, from layer_{L}_expert_{E}_mp_rank_00_model_states.pt, into a
#                         model built with expert_parallel_size=1 (all experts local)
#     pipeline stages     layer_XX-model_states.pt, one per pipeline layer (the family's pipeline form
#                         names each layer's prefix in the plain model's state_dict)
#     ZeRO-3              the fp32 partitions merged by DeepSpeed's zero_to_fp32
#
# Every file is unpickled through safe_load (weights only, DeepSpeed's allow-list) after the checkpoint's
# files are checked against the manifest written with it.


class UnsafeCheckpoint(RuntimeError):
    """A checkpoint file would run code outside the allow-list when unpickled."""


def _enum_member(enum_class, name):
    """Stands in for ``getattr`` while a checkpoint is unpickled: Python 3.11.0-3.11.4 pickle an enum member as
    ``getattr(EnumClass, "name")`` (later versions as ``EnumClass(value)``), so a checkpoint saved there holds
    DeepSpeed's ZeroStageEnum that way. Only members of the allow-listed enums are looked up; any other getattr
    is refused."""
    allowed = deepspeed_compat.checkpoint_allowed_globals()
    if not (isinstance(enum_class, type) and issubclass(enum_class, enum.Enum) and enum_class in allowed):
        raise pickle.UnpicklingError(f"GLOBAL builtins.getattr on {enum_class!r}, which is not an allow-listed enum")
    return enum_class[name]


def safe_load(path, map_location=None, mmap=False):
    """torch.load without arbitrary code: weights_only with DeepSpeed's allow-listed classes; ``mmap``: tensors
    stay in the file, read as they are used."""
    try:
        with torch.serialization.safe_globals([*deepspeed_compat.checkpoint_allowed_globals(), (_enum_member, "builtins.getattr")]):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        raise UnsafeCheckpoint(
            f"{path} asks to run {found.group(1) if found else 'code'} when loaded, which is not on "
            f"the allow-list; refusing it (load it by hand only if you trust its source)"
        ) from None


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def damage(save_dir, tag):
    """Why checkpoint ``tag`` cannot be trusted, or None when every file matches its manifest."""
    directory = os.path.join(save_dir, tag)
    try:
        with open(os.path.join(directory, MANIFEST)) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"no readable {MANIFEST} ({e.__class__.__name__})"
    for rel, expected in files.items():
        path = os.path.join(directory, rel)
        if not os.path.isfile(path):
            return f"{rel} is missing"
        if os.path.getsize(path) != expected["bytes"]:
            return f"{rel} has {os.path.getsize(path)} bytes, expected {expected['bytes']}"
        if sha256(path) != expected["sha256"]:
            return f"{rel} does not match its SHA-256"
    return None


def _latest_manifest_field(save_dir, key):
    tag = read_latest(save_dir)
    try:
        with open(os.path.join(save_dir, tag, MANIFEST)) as f:
            return json.load(f)[key]
    except (OSError, ValueError, KeyError):
        return None


def saved_dp_size(save_dir):
    """Data-parallel size of the checkpoint ``latest`` names (read before any rank starts)."""
    return _latest_manifest_field(save_dir, "dp_size")


def saved_sequence_parallel_size(save_dir):
    """Sequence-parallel size of the checkpoint ``latest`` names; None where its manifest predates the field (1)."""
    return _latest_manifest_field(save_dir, "sequence_parallel_size")


def saved_expert_parallel_size(save_dir):
    """Expert-parallel size of the checkpoint ``latest`` names; None where its manifest predates the field (the
    run's record, run_config.json, then says it, unless a launch at another size failed before saving)."""
    return _latest_manifest_field(save_dir, "expert_parallel_size")


def _check_run_dir(run_dir):
    if not os.path.isdir(run_dir):
        raise ConfigError(f"run directory {run_dir} does not exist; pass the --save_dir of a pretrain/main.py run")


def require_run_config(run_dir):
    """The run's record; a ConfigError when ``run_dir`` is no run (evaluation's view of read_run_config)."""
    _check_run_dir(run_dir)
    recorded = read_run_config(run_dir)
    if recorded is None:
        raise ConfigError(f"{os.path.join(run_dir, RUN_CONFIG)} does not exist; {run_dir} is not the --save_dir of a pretrain/main.py run")
    return recorded


def resolve_tag(run_dir, tag=None):
    """The checkpoint tag to load: ``tag`` if given, else the one ``latest`` names."""
    _check_run_dir(run_dir)
    if tag is None:
        if not os.path.isfile(os.path.join(run_dir, LATEST)):
            raise ConfigError(f"{run_dir} holds no checkpoint ('{LATEST}' is missing); let the run save one, or pass a tag")
        tag = read_latest(run_dir)
    if not os.path.isdir(os.path.join(run_dir, tag)):
        raise ConfigError(f"checkpoint {tag} is not in {run_dir} (it has: {', '.join(complete_tags(run_dir)) or 'none'})")
    return tag


def run_tokenizer(run_dir, spec):
    """The tokenizer a run recorded: bytes, or its sentencepiece model (at the recorded path or, moved
    with the run, in the run directory or beside it), checked against the recorded sha256."""
    if spec["type"] == "bytes":
        return ByteTokenizer()
    name = os.path.basename(spec["path"])
    for path in (spec["path"], os.path.join(run_dir, name), os.path.join(os.path.dirname(os.path.abspath(run_dir)), name)):
        if os.path.isfile(path):
            tokenizer = SentencePieceTokenizer(path)
            if tokenizer.sha256 != spec["sha256"]:
                raise ConfigError(
                    f"tokenizer {path} is not the one {run_dir} was trained with (sha256 {tokenizer.sha256[:12]}, "
                    f"recorded {spec['sha256'][:12]}); put the original {name} in {run_dir}"
                )
            return tokenizer
    raise ConfigError(
        f"{run_dir} was trained with tokenizer {spec['path']}, which no longer exists (nor in or beside "
        f"the run directory); copy {name} into {run_dir}"
    )


def run_source_tokenizer(run_dir):
    """A translation run's source-side tokenizer: its own when the sides had one each, else the run's only one."""
    run_config = require_run_config(run_dir)
    return run_tokenizer(run_dir, run_config.get("src_tokenizer", run_config["tokenizer"]))


def recorded_model_config(run_config, run_dir):
    """The model config a run recorded, for a model on one process."""
    # The launch fields are the launch's: evaluation holds every expert on one process (expert_parallel_size 1),
    # and runs no backward (checkpoint_reentrant is unused).
    raw = without_launch_fields(run_config["model"])
    return config_from_dict(raw, where=f"{os.path.join(run_dir, RUN_CONFIG)} model")


def zero3_state_dict(run_dir, tag):
    # zero_to_fp32 reports progress with print(); stdout is for results.
    with contextlib.redirect_stdout(sys.stderr):
        return deepspeed_compat.zero3_fp32_state_dict(run_dir, tag, safe_load)


def pipeline_state_dict(directory, config):
    """The plain model's state_dict from the per-layer files of a pipeline checkpoint (tag directory ``directory``)."""
    state = {}
    for index, prefix in enumerate(family_of(config).pipeline.state_dict_prefixes(config)):
        if prefix is not None:
            layer = safe_load(os.path.join(directory, f"layer_{index:02d}-model_states.pt"), map_location="cpu")
            state.update({prefix + k: v for k, v in layer.items()})
    return state


def expert_state_dict(run_dir, tag, config):
    """Every expert of every MoE layer. DeepSpeed numbers MoE layers 0, 1, ... in module order and names
    each file and key by the expert's global index, which is its local index when all experts are local."""
    state = {}
    for moe_layer in range(len(config.layers_with_experts())):
        for expert in range(config.num_experts):
            path = deepspeed_compat.expert_checkpoint_path(run_dir, moe_layer, expert, tag)
            if not os.path.isfile(path):
                raise ConfigError(f"{path} is missing; the checkpoint lacks expert {expert} of MoE layer {moe_layer}")
            state.update(safe_load(path, map_location="cpu"))
    return state


def checkpoint_state_dict(run_dir, tag, config):
    """The model's full state_dict from checkpoint ``tag``, whichever way it was written."""
    directory = os.path.join(run_dir, tag)
    if os.path.isfile(os.path.join(directory, "layer_00-model_states.pt")):
        return pipeline_state_dict(directory, config)
    if os.path.isfile(os.path.join(directory, "zero_pp_rank_0_mp_rank_00_model_states.pt")):  # ZeRO-3's name
        return zero3_state_dict(run_dir, tag)
    path = os.path.join(directory, "mp_rank_00_model_states.pt")
    if not os.path.isfile(path):
        raise ConfigError(
            f"{directory} holds no model states (no mp_rank_00_model_states.pt, layer_00-model_states.pt "
            f"or zero_pp_rank_0_mp_rank_00_model_states.pt); is it a complete DeepSpeed checkpoint?"
        )
    state = safe_load(path, map_location="cpu")["module"]
    if family_of(config).experts:  # DeepSpeed keeps experts out of "module", in files of their own
        state.update(expert_state_dict(run_dir, tag, config))
    return state


def load_model(run_dir, tag=None, architecture=None, command=None):
    """(model in eval mode on the CPU, its config, the run's tokenizer) of checkpoint ``tag`` (default: latest).
    With ``architecture``, a run of another kind is refused, before any weight is read, for ``command``."""
    run_dir = str(run_dir)
    run_config = require_run_config(run_dir)
    config = recorded_model_config(run_config, run_dir)
    if architecture is not None:
        check_architecture(config, architecture, f"{command} of {run_dir}")
    tokenizer = run_tokenizer(run_dir, run_config["tokenizer"])
    tag = resolve_tag(run_dir, tag)
    problem = damage(run_dir, tag)  # every file against the manifest written with it (pretrain/checkpoint.py)
    if problem is not None:
        intact = [t for t in complete_tags(run_dir) if t != tag and damage(run_dir, t) is None]
        raise ConfigError(
            f"checkpoint {os.path.join(run_dir, tag)} is damaged ({problem}); "
            + (f"pass --tag {intact[0]} (the newest intact one)" if intact else "no intact checkpoint is left")
        )
    model = build_model(config)
    model.load_state_dict(checkpoint_state_dict(run_dir, tag, config), strict=True)
    return model.eval(), config, tokenizer
