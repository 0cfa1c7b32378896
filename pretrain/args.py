"""Command-line arguments of pretrain/main.py. Settings that live in the DeepSpeed JSON
(batch sizes, precision, ZeRO stage, optimizer, scheduler) have no flag here on purpose."""

import argparse
import os

from switchyard.errors import ConfigError


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(f"{message}; see python pretrain/main.py --help")


def build_parser():
    p = OneLineParser(description="Pretrain a Switchyard model through a DeepSpeed engine.")
    p.add_argument("--ds_config", required=True, help="DeepSpeed JSON config (ds_configs/*.json)")
    p.add_argument("--model_config", required=True, help="model config JSON (models/configs/*.json)")
    p.add_argument("--task", default="lm", help="registered task name (pretrain/tasks/)")
    p.add_argument(
        "--train_data", required=True, nargs="+", help="UTF-8 text files or preprocessed PREFIXes; several are blended (see --train_data_weights)"
    )
    p.add_argument(
        "--train_data_weights",
        type=float,
        nargs="+",
        default=None,
        help="one positive weight per --train_data corpus: its share of training samples (default: proportional to size)",
    )
    p.add_argument("--val_data", default=None, help="validation text file (default: the tail of each --train_data corpus)")
    p.add_argument("--val_fraction", type=float, default=0.05, help="tail fraction held out when --val_data is not given")
    p.add_argument(
        "--tokenizer", default=None, help="'bytes' or a sentencepiece .model file (default: the one preprocessed data were made with, else bytes)"
    )
    p.add_argument("--seq_len", type=int, default=None, help="training sequence length (default: the model's max_seq_len)")
    p.add_argument("--label_smoothing", type=float, default=0.1, help="--task translation: label smoothing of the cross entropy")
    p.add_argument(
        "--bleu_src", default=None, help="--task translation: dev source text, one sentence per line, translated at each validation for val/bleu"
    )
    p.add_argument("--bleu_ref", nargs="+", default=None, help="--task translation: --bleu_src's reference translation file(s)")
    p.add_argument("--bleu_beam", type=int, default=4, help="--task translation: beam size of the val/bleu translations")
    p.add_argument("--teacher", default=None, help="--task distill: the teacher's run directory (its --save_dir)")
    p.add_argument("--distill_task", default="lm", help="--task distill: the task whose data and loss the student trains on")
    p.add_argument("--distill_alpha", type=float, default=0.25, help="--task distill: weight of the teacher's soft targets")
    p.add_argument("--distill_temperature", type=float, default=1.0, help="--task distill: softmax temperature of the soft targets")
    p.add_argument(
        "--init_from_teacher",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="--task distill: start the student from the teacher's non-expert weights",
    )
    p.add_argument("--max_steps", type=int, required=True, help="optimizer steps to train (in total, counting resumed ones)")
    p.add_argument("--save_dir", required=True, help="run directory: checkpoints, metrics.jsonl, W&B files")
    p.add_argument("--save_interval", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint in --save_dir")
    p.add_argument(
        "--extend_schedule",
        action="store_true",
        help='with --resume and a longer --max_steps: stretch the learning-rate schedule\'s "auto" '
        "total_num_steps to the new --max_steps (without it the schedule keeps the length the run recorded)",
    )
    p.add_argument(
        "--replace_run",
        action="store_true",
        help="start over in a --save_dir that holds a run: its files are moved into SAVE_DIR/replaced/TIMESTAMP/ "
        "first (a start without --resume or this flag is refused there)",
    )
    p.add_argument("--keep_checkpoints", type=int, default=3, help="keep the newest N checkpoints (0: all)")
    p.add_argument(
        "--max_bad_steps",
        type=int,
        default=10,
        help="stop after N consecutive skipped steps (non-finite loss/gradients, fp16 overflow at the minimum scale)",
    )
    p.add_argument("--eval_interval", type=int, default=0, help="validation loss every N steps (0: only at the end)")
    p.add_argument("--eval_iters", type=int, default=4, help="validation micro-batches per rank")
    p.add_argument(
        "--log_interval",
        type=int,
        default=10,
        help="log every N steps; a stop signal (SIGTERM, SIGUSR1) is acted on at the next log, validation or checkpoint step",
    )
    p.add_argument(
        "--distributed_timeout_minutes",
        type=float,
        default=60.0,
        help="a collective (gloo or NCCL) that waits longer fails the job; long enough for what one rank does "
        "alone while the others wait (a first op build, hashing a large checkpoint)",
    )
    p.add_argument(
        "--heartbeat_timeout_s",
        type=float,
        default=300.0,
        help="a rank whose watchdog has not beaten for this long (frozen, killed, host lost) is named and every rank ends with exit code 4",
    )
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--wandb_project", default=None, help="log to W&B (offline when WANDB_API_KEY is unset)")
    p.add_argument("--wandb_run_name", default=None)
    p.add_argument(
        "--peak_tflops",
        type=float,
        default=None,
        help="per-device peak TFLOP/s for MFU (default: known GPUs' bf16 dense peak; MFU is not reported on CPU)",
    )
    p.add_argument(
        "--tf32",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fp32 runs on NVIDIA GPUs: matmuls on TF32 tensor cores (torch.set_float32_matmul_precision('high')); "
        "--no-tf32 keeps full fp32. No effect in bf16/fp16 or on CPU",
    )
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help="set by the deepspeed launcher")
    return p


def data_exists(path):
    """A text file, a preprocessed token file given as PREFIX or PREFIX.bin (python -m pretrain.preprocess), or
    sentence pairs PREFIX.src/.tgt (python -m pretrain.preprocess_pairs)."""
    return os.path.isfile(path) or os.path.isfile(f"{path}.bin") or os.path.isfile(f"{path}.src.bin")


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    checks = [
        (args.max_steps >= 1, f"--max_steps must be >= 1, got {args.max_steps}"),
        (args.save_interval >= 0, "--save_interval must be >= 0"),
        (args.eval_interval >= 0, "--eval_interval must be >= 0"),
        (args.eval_iters >= 1, "--eval_iters must be >= 1"),
        (args.log_interval >= 1, "--log_interval must be >= 1"),
        (0 < args.distributed_timeout_minutes < float("inf"), "--distributed_timeout_minutes must be a positive number"),
        (0 < args.heartbeat_timeout_s < float("inf"), "--heartbeat_timeout_s must be a positive number"),
        (args.keep_checkpoints >= 0, "--keep_checkpoints must be >= 0"),
        (args.max_bad_steps >= 1, "--max_bad_steps must be >= 1"),
        (
            args.resume or not args.extend_schedule,
            "--extend_schedule stretches a resumed run's learning-rate schedule; pass it with --resume (a new run's "
            '"auto" schedule follows --max_steps already)',
        ),
        (0.0 <= args.val_fraction < 1.0, f"--val_fraction must be in [0, 1), got {args.val_fraction}"),
        (args.seq_len is None or args.seq_len >= 1, "--seq_len must be >= 1"),
        *[(data_exists(path), f"--train_data {path} does not exist; pass a text file or a preprocessed PREFIX") for path in args.train_data],
        (
            args.train_data_weights is None or len(args.train_data_weights) == len(args.train_data),
            f"--train_data_weights has {len(args.train_data_weights or [])} weights for {len(args.train_data)} --train_data "
            f"corpora; give one weight per corpus, in the same order",
        ),
        (
            args.train_data_weights is None or all(0 < w < float("inf") for w in args.train_data_weights),
            f"--train_data_weights {args.train_data_weights} must all be positive and finite; drop a corpus instead of weighting it 0",
        ),
        *[
            (os.path.isfile(path), f"--bleu_src/--bleu_ref {path} does not exist; pass text files, one sentence per line")
            for path in [args.bleu_src or "", *(args.bleu_ref or [])]
            if path
        ],
        ((args.bleu_src is None) == (args.bleu_ref is None), "--bleu_src and --bleu_ref go together: pass both or neither"),
        (
            args.bleu_src is None or "translation" in (args.task, args.distill_task if args.task == "distill" else None),
            f"--bleu_src scores translation models; --task {args.task} trains a language model: drop --bleu_src/--bleu_ref",
        ),
        (args.bleu_beam >= 1, f"--bleu_beam must be >= 1, got {args.bleu_beam}"),
        (
            args.val_data is None or data_exists(args.val_data),
            f"--val_data {args.val_data} does not exist; pass a text file or a preprocessed PREFIX",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    return args
