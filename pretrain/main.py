"""Entry point: deepspeed pretrain/main.py --ds_config ds_configs/X.json --model_config ... (or torchrun, or python).

Arguments and both configs are checked before torch.distributed starts or any model is
allocated; a problem is one line on stderr and exit code 2.
"""

import os
import sys
import traceback

from switchyard.errors import ConfigError

EXIT_CONFIG = 2  # bad arguments or configs
EXIT_DIVERGED = 3  # too many consecutive non-finite steps; the last good checkpoint is untouched
EXIT_DISK_FULL = 74  # a checkpoint did not fit on the disk; the previous one is intact (EX_IOERR)
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as shells report it)
EXIT_REQUEUE = 75  # stopped by SIGTERM/SIGUSR1 after saving a checkpoint: requeue and --resume (EX_TEMPFAIL)


def prepare(argv):
    """Everything that can be checked without a process group: args, model and DeepSpeed configs, data."""
    from deepspeed.accelerator import get_accelerator

    from models import load_model_config
    from models.registry import family_of, with_launch_fields
    from pretrain import distributed, run_dir, seqlen_warmup
    from pretrain.args import parse_args
    from pretrain.ds_config import (
        check_device_features,
        launch_checkpointing,
        load_ds_config,
        optimizer_for_device,
        plan_launch,
        plan_resume,
        resolve_nvme_paths,
        resolve_schedule,
    )
    from pretrain.tasks import TASKS

    args = parse_args(argv)
    if args.task not in TASKS:
        raise ConfigError(f"unknown --task {args.task!r}; registered tasks: {', '.join(sorted(TASKS))}")
    model_config = load_model_config(args.model_config)
    ds_config = load_ds_config(args.ds_config)
    plan = plan_launch(ds_config, args.ds_config, distributed.world_size_from_env(), model_config)
    check_device_features(ds_config, args.ds_config, get_accelerator().device_name())
    ds_config, optimizer_notice = optimizer_for_device(ds_config, args.ds_config, get_accelerator().device_name())
    ds_config = resolve_nvme_paths(ds_config, args.ds_config)
    if plan.precision == "fp16":
        if not get_accelerator().is_fp16_supported():
            raise ConfigError(
                f"DeepSpeed config {args.ds_config} enables fp16, which this device "
                f"({get_accelerator().device_name()}) does not support; use bf16 (ds_configs/bf16_zero1.json) or fp32"
            )
    if family_of(model_config).experts:
        model_config = with_launch_fields(model_config, expert_parallel_size=plan.expert_parallel_size)
    model_config = with_launch_fields(model_config, **launch_checkpointing(ds_config))
    run_dir.check_start(args.save_dir, args.resume, args.replace_run)  # read only: claim() applies it again under the lock
    recorded = (run_dir.read_run_config(args.save_dir) or {}).get("deepspeed") if args.resume else None
    ds_config, schedule_notice = resolve_schedule(ds_config, args.ds_config, args.max_steps, args.resume, recorded, args.extend_schedule)
    if args.resume:
        saved_ep_size = run_dir.saved_expert_parallel_size(args.save_dir)
        if saved_ep_size is None and recorded:  # a checkpoint from before the manifest recorded it
            saved_ep_size = (recorded.get("moe") or {}).get("expert_parallel_size", 1)
        plan, ds_config = plan_resume(
            plan,
            ds_config,
            args.ds_config,
            run_dir.saved_dp_size(args.save_dir),
            model_config,
            saved_ep_size,
            run_dir.saved_sequence_parallel_size(args.save_dir),
        )
    if plan.seqlen_warmup:
        seqlen_warmup.check_launch(plan.seqlen_warmup, args.ds_config, plan, args.task, TASKS[args.task])
    task = TASKS[args.task](args, model_config, plan)  # reads tokenizer and data: their errors come before any rank starts
    if plan.seqlen_warmup:
        seqlen_warmup.check_length(plan.seqlen_warmup, args.ds_config, task.seq_len)
    notices = [optimizer_notice, schedule_notice]
    if args.resume:
        notices.append(run_dir.check_resume_compatible(args.save_dir, model_config, ds_config, task_tokenizers(task)))
    for notice in notices:
        if notice and distributed.rank_from_env() == 0:
            print(notice, flush=True)
    for warning in stale_build_locks() if distributed.rank_from_env() == 0 else []:
        print(warning, file=sys.stderr, flush=True)
    return args, model_config, ds_config, plan, task


STALE_BUILD_LOCK_S = 15 * 60  # a DeepSpeed op builds in minutes; a lock this old is a build that was killed


def stale_build_locks(now=None):
    """A warning line for each lock of torch's JIT builds (DeepSpeed compiles its ops through them) older than
    STALE_BUILD_LOCK_S: a job killed mid-build leaves its lock behind, and every later start that needs that op
    waits on it forever, silently. A warning, not a refusal: another job may be building right now."""
    import glob
    import time

    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()  # what torch's build directory follows
    now = time.time() if now is None else now
    warnings = []
    for lock in sorted(glob.glob(os.path.join(root, "*", "lock")) + glob.glob(os.path.join(root, "*", "*", "lock"))):
        age = now - os.path.getmtime(lock)
        if age > STALE_BUILD_LOCK_S:
            warnings.append(
                f"warning: {lock} is {age / 60:.0f} minutes old: a JIT build of a DeepSpeed op killed mid-way leaves "
                f"it, and every start that needs the op then waits on it forever; remove it if no build is running"
            )
    return warnings


def task_tokenizers(task):
    """The tokenizers a run records, by name: the one outputs are decoded with, and a translation run's source side
    when the sides have one each."""
    tokenizers = {"tokenizer": task.tokenizer.spec}
    if getattr(task, "src_tokenizer", task.tokenizer) is not task.tokenizer:
        tokenizers["src_tokenizer"] = task.src_tokenizer.spec
    return tokenizers


def optimizer_param_groups(model):
    """Weight decay on matrices only (not biases, LayerNorms); MoE params in their own groups for ZeRO."""
    from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer

    from switchyard.deepspeed_compat import full_shape

    def is_matrix(p):  # of stacked experts (models/switch.py), each expert's slice: a bias is [experts, d]
        return len(full_shape(p)) - getattr(p, "stacked_experts", False) >= 2

    decay = [p for p in model.parameters() if is_matrix(p)]
    no_decay = [p for p in model.parameters() if not is_matrix(p)]
    groups = [{"params": decay, "name": "decay"}, {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    if any(is_moe_param(p) for p in model.parameters()):
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return groups


def zero3_init(ds_config):
    """``deepspeed.zero.Init`` that builds the model a plain build would, partitioned as each module is made.

    Each module is made as without it: fp32 on the CPU, so its constructor's default initialisation
    draws from the global CPU RNG exactly as a plain build does (DeepSpeed's default tensor overrides
    would create the tensors on the accelerator, drawing from its RNG, and in bf16/fp16, drawing
    differently). Then, before DeepSpeed partitions the module, its parameters are cast to the training
    dtype (what the engine does to a whole model; it does not cast a zero.Init model) and its buffers
    moved to the device (the engine does not move a zero.Init model either).
    memory_efficient_linear is off: DeepSpeed would otherwise replace torch.nn.functional.linear for
    the rest of the process, which a plain build does not."""
    import copy

    from switchyard.deepspeed_compat import is_partitioned, zero_init

    def cast_and_move(module, dtype, device):
        for param in module.parameters(recurse=False):
            if not is_partitioned(param) and param.is_floating_point():
                param.data = param.data.to(dtype)
        for name, buffer in module.named_buffers(recurse=False):
            module._buffers[name] = buffer.to(device)

    config = copy.deepcopy(ds_config)
    config.setdefault("zero_optimization", {})["memory_efficient_linear"] = False
    return zero_init(config, before_partition=cast_and_move)


def build_model(args, model_config, ds_config, plan, task):
    """The task's model from seed ``args.seed`` (the same on every rank: replicated weights start equal).

    Under ZeRO-3 it is built inside ``deepspeed.zero.Init``: each module is partitioned as soon as it is
    made, so no rank holds the whole model at any time, only one module whole at a time plus its 1/N of
    the rest. The weights are bit-identical to a plain build's (tests/pretrain/test_main_zero.py).
    The distill task's teacher is not built here: it is loaded whole on every rank before (it is frozen
    and runs outside the engine, so ZeRO-3 could not gather it for its forward)."""
    import torch

    torch.manual_seed(args.seed)
    if plan.zero_stage != 3:
        return task.build_model()
    with zero3_init(ds_config):
        return task.build_model()


def build_engine(args, model_config, ds_config, plan, task):
    """The model and its DeepSpeed engine, as training uses them; returns (engine, training FLOPs per token)."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from models.registry import family_of
    from switchyard.deepspeed_compat import local_numel

    model = build_model(args, model_config, ds_config, plan, task)
    total, active = model.param_counts()  # of the whole model, also when ZeRO-3 has partitioned it
    flops = model.flops_per_token(task.seq_len)
    held = sum(local_numel(p) for p in model.parameters())
    if dist.get_rank() == 0:
        print(
            f"model {family_of(model_config).name}: {total:,} parameters, {active:,} active per token, "
            f"{flops / 1e9:.3f} GFLOPs per token (training); {plan}",
            flush=True,
        )
        print(
            f"built: rank 0 holds {held:,} parameter values ({held / total:.1%} of the model)"
            f"{' (ZeRO-3: partitioned while built, deepspeed.zero.Init)' if plan.zero_stage == 3 else ''}",
            flush=True,
        )
    mpu = None
    if plan.sequence_parallel_size > 1:  # DeepSpeed-Ulysses: the model reads slices, the engine reduces over them
        from models.ulysses import split_sequences

        mpu = split_sequences(model, plan.sequence_parallel_size)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=optimizer_param_groups(model), config=ds_config, mpu=mpu)
    if model_config.checkpoint_activations:  # the activation_checkpointing section (or DeepSpeed's defaults) for its checkpoint
        deepspeed.checkpointing.configure(None, deepspeed_config=ds_config)
    torch.manual_seed(args.seed + dist.get_rank())  # dropout differs across data-parallel ranks
    return engine, flops


def claim_run_dir(args):
    """Rank 0 locks --save_dir (and, with --replace_run, moves the old run aside); every rank learns the outcome,
    so a refusal ends all of them with exit 2 instead of leaving the others waiting for rank 0."""
    import torch.distributed as dist

    from pretrain import run_dir

    outcome = [None, None]  # (refusal, where the replaced run went)
    lock = None
    if dist.get_rank() == 0:
        try:
            lock, moved = run_dir.claim(args.save_dir, args.resume, args.replace_run)
            outcome[1] = moved
        except ConfigError as e:
            outcome[0] = str(e)
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0]:
        raise ConfigError(outcome[0])
    if outcome[1] and dist.get_rank() == 0:
        print(f"--replace_run: the previous run in {args.save_dir} is now in {outcome[1]}", flush=True)
    return lock


def run(args, model_config, ds_config, plan, task, signals):
    import torch.distributed as dist

    from models import config_to_dict
    from pretrain import distributed, run_dir
    from pretrain.metrics import MetricsLogger, without_secrets
    from pretrain.run_dir import UnsafeCheckpoint
    from pretrain.trainer import Trainer, TrainingDiverged
    from pretrain.watchdog import Watchdog, forward_runner_termination

    forward_runner_termination(signals.runner_terminated)
    distributed.init(args.distributed_timeout_minutes, plan.precision, args.tf32)
    watchdog = Watchdog(args.heartbeat_timeout_s).start()
    lock = None
    try:
        lock = claim_run_dir(args)
        watchdog.before_exit = lock.release if lock is not None else None
        engine, flops = build_engine(args, model_config, ds_config, plan, task)
        rank0 = dist.get_rank() == 0
        logger = MetricsLogger(
            args.save_dir,
            rank0,
            args.wandb_project,
            args.wandb_run_name,
            run_config=without_secrets({**vars(args), "model": config_to_dict(model_config), "deepspeed": ds_config}),
        )
        trainer = Trainer(engine, task, plan, args, logger, flops, signals)
        if args.resume:
            trainer.resume()
        if rank0:  # after a resume has loaded: a launch that fails to resume leaves the run's record as it was
            run_dir.write_run_config(
                args.save_dir,
                {"args": without_secrets(vars(args)), "model": config_to_dict(model_config), "deepspeed": ds_config, **task_tokenizers(task)},
            )
        try:
            return trainer.train(), watchdog
        finally:
            logger.close()
    except (TrainingDiverged, UnsafeCheckpoint, ConfigError):
        watchdog.stop()  # every rank meets these together and ends: a peer gone now is no failure
        raise
    except Exception as e:  # this rank alone: the others end at once instead of waiting for it in a collective
        earlier = watchdog.posted_failure()
        if earlier:  # the consequence of another rank's failure (its collectives lost their peer): name that one
            watchdog.end(earlier)
        watchdog.post_failure(f"rank {dist.get_rank()} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        watchdog.stop()  # this rank ends by its own exception: the store going with rank 0 is no news to it
        raise
    finally:
        if lock is not None:
            lock.release()


def last_checkpoint(save_dir):
    """Where a stopped run can go on from, in words."""
    from pretrain import run_dir

    tags = run_dir.complete_tags(save_dir)
    return (
        f"the last complete checkpoint is {os.path.join(save_dir, tags[0])}: continue with --resume"
        if tags
        else f"no checkpoint was saved in {save_dir}"
    )


def main(argv=None):
    from pretrain.trainer import StopSignals

    signals = StopSignals()  # first: a warning signal during start-up must not kill the rank, only stop it after a step
    try:
        prepared = prepare(argv)
    except ConfigError as e:
        if os.environ.get("RANK", "0") == "0":  # every rank finds the same problem; one line is enough
            print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":
            print("error: interrupted (Ctrl-C) before training started; nothing was written", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    from pretrain import distributed
    from pretrain.checkpoint import DiskFull
    from pretrain.run_dir import UnsafeCheckpoint
    from pretrain.trainer import TrainingDiverged

    try:
        outcome, watchdog = run(*prepared, signals)
    except (TrainingDiverged, UnsafeCheckpoint, ConfigError) as e:  # found once ranks run: every rank raises it
        if distributed.rank_from_env() == 0:
            print(f"error: {e}", file=sys.stderr)
        distributed.exit_now(EXIT_DIVERGED if isinstance(e, TrainingDiverged) else EXIT_CONFIG)
    except DiskFull as e:  # the rank that met it says so (the others end naming it, through the watchdog)
        print(f"error: rank {distributed.rank_from_env()}: {e}", file=sys.stderr)
        distributed.exit_now(EXIT_DISK_FULL)
    except KeyboardInterrupt:  # Ctrl-C reaches every rank of the terminal's process group
        if distributed.rank_from_env() == 0:
            print(f"error: interrupted (Ctrl-C); {last_checkpoint(prepared[0].save_dir)}", file=sys.stderr)
        distributed.exit_now(EXIT_INTERRUPTED)
    except Exception:  # a crash: its traceback, then out without interpreter shutdown (gloo may abort there)
        traceback.print_exc()
        distributed.exit_now(1)
    distributed.finish(0 if outcome == "done" else EXIT_REQUEUE, watchdog)


if __name__ == "__main__":
    main()
