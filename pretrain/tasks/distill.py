"""Distillation: a (dense) student learns from a frozen teacher checkpoint's soft targets and from the data.

    deepspeed pretrain/main.py --task distill --teacher runs/switch --distill_task lm \\
        --model_config models/configs/tiny-gpt.json --ds_config ds_configs/zero1.json --train_data ...

The student trains on what --distill_task (lm or translation) would train it on, with the loss

    (1 - alpha) x hard + alpha x T^2 x KL(softmax(teacher / T) || softmax(student / T))

averaged over the target tokens (Hinton et al., 2015; T^2 keeps the soft term's gradients at the
same scale for any T), where hard is --distill_task's own loss. The Switch Transformer paper's best
recipe (Fedus et al., 2021, sec. 5.1) is the default: alpha = 0.25 (--distill_alpha) and the
student starting from the teacher's non-expert weights (every tensor of the same name and shape:
embeddings, attention, LayerNorms and the dense FFNs; --no-init_from_teacher for a random start).

The teacher is the checkpoint's plain model (pretrain.run_dir.load_model: every expert on every
rank, so any expert-parallel layout it was trained in works), frozen, in eval mode (its
evaluation capacity factor) and in the student's precision. Logged: train/lm_loss is the hard
loss, so it and val/loss compare with a run trained without the teacher; train/loss is the total.
"""

import torch
import torch.nn.functional as F

from pretrain.distributed import rank_from_env
from pretrain.tasks import TASKS, register_task
from switchyard.errors import ConfigError

IGNORE = -100  # targets the hard loss skips (translation's padding); LM targets have none
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def soft_target_loss(student_logits, teacher_logits, targets, temperature):
    """T^2 x KL(teacher || student) at temperature T, mean over the positions whose target is not IGNORE.

    A sum over the kept positions divided by their count, not ``per_token[keep].mean()``: indexing by a mask has a
    data-dependent shape, which on a GPU waits for the device to count the mask, at every micro-batch."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_token = F.kl_div(log_student, log_teacher, log_target=True, reduction="none").sum(-1)
    keep = targets != IGNORE
    # where, not a product with the mask: a non-finite KL at a padding position must not make the sum NaN (0 x inf).
    return temperature**2 * torch.where(keep, per_token, 0.0).sum() / keep.sum()


@register_task("distill")
class DistillationTask:
    def __init__(self, args, model_config, plan):
        from pretrain.run_dir import load_model, run_source_tokenizer  # the teacher is read as any evaluation reads a run

        if not args.teacher:
            raise ConfigError("--task distill needs --teacher RUN_DIR (the --save_dir of the teacher's run)")
        if args.distill_task not in TASKS or args.distill_task == "distill":
            raise ConfigError(f"--distill_task must be one of {sorted(set(TASKS) - {'distill'})}, got {args.distill_task!r}")
        if not 0.0 <= args.distill_alpha <= 1.0 or args.distill_temperature <= 0:
            raise ConfigError(
                f"--distill_alpha must be in [0, 1] and --distill_temperature > 0, got {args.distill_alpha} and {args.distill_temperature}"
            )
        if plan.pipeline_stages > 1:
            raise ConfigError("--task distill does not run in pipeline stages; drop 'pipeline' from the DeepSpeed config")
        if plan.sequence_parallel_size > 1:  # its teacher runs whole, outside the engine, on whole sequences
            raise ConfigError("--task distill does not split sequences; drop sequence_parallel_size from the DeepSpeed config")
        self.base = TASKS[args.distill_task](args, model_config, plan)
        self.alpha, self.temperature, self.init_from_teacher = args.distill_alpha, args.distill_temperature, args.init_from_teacher
        self.seq_len, self.tokenizer, self.val = self.base.seq_len, self.base.tokenizer, self.base.val

        teacher, teacher_config, teacher_tokenizer = load_model(args.teacher)
        if teacher_config.vocab_size != model_config.vocab_size:
            raise ConfigError(
                f"teacher {args.teacher} has a vocabulary of {teacher_config.vocab_size}, the student "
                f"({args.model_config}) {model_config.vocab_size}; they must match for soft targets"
            )
        if teacher_tokenizer.spec != self.tokenizer.spec:
            raise ConfigError(
                f"teacher {args.teacher} was trained with another tokenizer than the training data's "
                f"({self.tokenizer.spec.get('path', self.tokenizer.spec['type'])}); distil on data made "
                f"with the teacher's tokenizer"
            )
        self.src_tokenizer = getattr(self.base, "src_tokenizer", self.tokenizer)  # translation's own source tokenizer
        if self.src_tokenizer is not self.tokenizer and run_source_tokenizer(args.teacher).spec != self.src_tokenizer.spec:
            raise ConfigError(
                f"teacher {args.teacher} was trained with another source tokenizer than the training data's "
                f"({self.src_tokenizer.model_path}); distil on data made with the teacher's tokenizers"
            )
        self.teacher = teacher.to(DTYPES[plan.precision]).requires_grad_(False).eval()
        self.teacher_name = args.teacher

    def build_model(self):
        import deepspeed

        student = self.base.build_model()
        if self.init_from_teacher:
            # Under ZeRO-3 the student is built partitioned (pretrain/main.py, deepspeed.zero.Init): it is
            # gathered whole for the copy (a no-op otherwise). The teacher is whole on every rank anyway.
            with deepspeed.zero.GatheredParameters(list(student.parameters()), modifier_rank=0):
                teacher = self.teacher.state_dict()
                student_state = student.state_dict()
                shared = {name: teacher[name].float() for name, t in student_state.items() if name in teacher and teacher[name].shape == t.shape}
                student.load_state_dict(shared, strict=False)
            if rank_from_env() == 0:
                print(
                    f"student initialized from teacher {self.teacher_name}: {len(shared)} of {len(student_state)} "
                    f"tensors (the rest, where the teacher has experts, start at random)",
                    flush=True,
                )
        return student

    def train_batch(self, consumed_samples, micro_step, micro_batch_size, dp_rank, dp_size):
        return self.base.train_batch(consumed_samples, micro_step, micro_batch_size, dp_rank, dp_size)

    def val_batch(self, i, micro_batch_size, dp_rank, dp_size):
        return self.base.val_batch(i, micro_batch_size, dp_rank, dp_size)

    def inputs(self, batch):
        return self.base.inputs(batch)

    def validation_metrics(self, model):
        """The student scored as --distill_task scores its models (translation: val/bleu with --bleu_src)."""
        return self.base.validation_metrics(model) if hasattr(self.base, "validation_metrics") else {}

    def targets(self, batch):
        return self.base.targets(batch)

    def loss(self, outputs, batch):
        """(loss to backprop, dict of detached parts to log): the hard part is logged as lm_loss."""
        hard, parts = self.base.loss(outputs, batch)
        inputs = self.inputs(batch)
        inputs = inputs if isinstance(inputs, tuple) else (inputs,)
        if next(self.teacher.parameters()).device != inputs[0].device:
            self.teacher.to(inputs[0].device)
        with torch.no_grad():
            teacher_logits = self.teacher(*inputs)[0]
        soft = soft_target_loss(outputs[0], teacher_logits, self.targets(batch), self.temperature)
        loss = (1 - self.alpha) * hard + self.alpha * soft
        return loss, {"lm_loss": parts["lm_loss"], "aux_loss": (loss - parts["lm_loss"]).detach(), "moe": parts["moe"]}
