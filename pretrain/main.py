"""Entry point: deepspeed pretrain/main.py --ds_config ds_configs/X.json --model_config ... (or torchrun, or python).

Arguments and both configs are checked before torch.distributed starts or any model is
allocated; a problem is one line on stderr and exit code 2.
"""
import dataclasses
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # launched by path: make the repo importable

from models.registry import ConfigError  # noqa: E402

EXIT_CONFIG = 2  # bad arguments or configs
EXIT_DIVERGED = 3  # too many consecutive non-finite steps; the last good checkpoint is untouched
EXIT_REQUEUE = 75  # stopped by SIGTERM/SIGUSR1 after saving a checkpoint: requeue and --resume (EX_TEMPFAIL)


def prepare(argv):
    """Everything that can be checked without a process group: args, model and DeepSpeed configs, data."""
    from models import load_model_config
    from pretrain import distributed
    from pretrain.args import parse_args
    from pretrain import checkpoint
    from pretrain.ds_config import load_ds_config, plan_launch, plan_resume
    from pretrain.tasks import TASKS

    args = parse_args(argv)
    if args.task not in TASKS:
        raise ConfigError(f"unknown --task {args.task!r}; registered tasks: {', '.join(sorted(TASKS))}")
    model_config = load_model_config(args.model_config)
    ds_config = load_ds_config(args.ds_config)
    plan = plan_launch(ds_config, args.ds_config, distributed.world_size_from_env(), model_config.family_name,
                       getattr(model_config, "num_experts", None))
    if hasattr(model_config, "expert_parallel_size"):
        model_config = dataclasses.replace(model_config, expert_parallel_size=plan.expert_parallel_size)
    if args.resume:
        if not os.path.isfile(os.path.join(args.save_dir, "latest")):
            raise ConfigError(f"--resume given but {args.save_dir} holds no checkpoint ('latest' is missing); drop --resume to start fresh")
        plan, ds_config = plan_resume(plan, ds_config, args.ds_config, checkpoint.saved_dp_size(args.save_dir), model_config.family_name)
    task = TASKS[args.task](args, model_config, plan)  # reads tokenizer and data: their errors come before any rank starts
    return args, model_config, ds_config, plan, task


def optimizer_param_groups(model):
    """Weight decay on matrices only (not biases, LayerNorms); MoE params in their own groups for ZeRO."""
    from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    groups = [{"params": decay, "name": "decay"}, {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    if any(is_moe_param(p) for p in model.parameters()):
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return groups


def build_engine(args, model_config, ds_config, plan, task):
    """The model and its DeepSpeed engine, as training uses them; returns (engine, training FLOPs per token)."""
    import deepspeed
    import torch
    import torch.distributed as dist

    torch.manual_seed(args.seed)  # same on every rank: replicated weights start equal
    model = task.build_model()
    total, active = model.param_counts()
    flops = model.flops_per_token(task.seq_len)
    if dist.get_rank() == 0:
        print(f"model {model_config.family_name}: {total:,} parameters, {active:,} active per token, "
              f"{flops / 1e9:.3f} GFLOPs per token (training); {plan}", flush=True)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=optimizer_param_groups(model), config=ds_config)
    torch.manual_seed(args.seed + dist.get_rank())  # dropout differs across data-parallel ranks
    return engine, flops


def run(args, model_config, ds_config, plan, task, signals):
    import torch.distributed as dist

    from models import config_to_dict
    from pretrain import distributed
    from pretrain.metrics import MetricsLogger, without_secrets
    from pretrain.trainer import Trainer

    distributed.init()
    engine, flops = build_engine(args, model_config, ds_config, plan, task)
    rank0 = dist.get_rank() == 0
    logger = MetricsLogger(args.save_dir, rank0, args.wandb_project, args.wandb_run_name,
                           run_config=without_secrets({**vars(args), "model": config_to_dict(model_config), "deepspeed": ds_config}))
    if rank0:
        with open(os.path.join(args.save_dir, "run_config.json"), "w") as f:
            json.dump({"args": without_secrets(vars(args)), "model": config_to_dict(model_config), "deepspeed": ds_config,
                       "tokenizer": task.tokenizer.spec}, f, indent=1)
    trainer = Trainer(engine, task, plan, args, logger, flops, signals)
    if args.resume:
        trainer.resume()
    try:
        outcome = trainer.train()
    finally:
        logger.close()
    return outcome


def main(argv=None):
    from pretrain.trainer import StopSignals
    signals = StopSignals()  # first: a warning signal during start-up must not kill the rank, only stop it after a step
    try:
        prepared = prepare(argv)
    except ConfigError as e:
        if os.environ.get("RANK", "0") == "0":  # every rank finds the same problem; one line is enough
            print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    from pretrain import distributed
    from pretrain.checkpoint import UnsafeCheckpoint
    from pretrain.trainer import TrainingDiverged
    try:
        outcome = run(*prepared, signals)
    except (TrainingDiverged, UnsafeCheckpoint) as e:
        if distributed.rank_from_env() == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(EXIT_DIVERGED if isinstance(e, TrainingDiverged) else EXIT_CONFIG)
    distributed.finish(0 if outcome == "done" else EXIT_REQUEUE)


if __name__ == "__main__":
    main()
