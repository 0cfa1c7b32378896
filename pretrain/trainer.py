"""The training loop. It knows engines and tasks, never a model's insides.

One step = grad_accum_steps micro-batches through engine.forward/backward/step (DeepSpeed
steps the optimizer on the last one), or through one PipelineEngine.train_batch when the model
is split into pipeline stages; then logging, validation and checkpointing.
"""

import contextlib
import signal
import time

import torch
import torch.distributed as dist

from models.registry import family_of
from pretrain import checkpoint
from pretrain.distributed import device
from pretrain.peak_flops import peak_tflops
from pretrain.progress import Progress, terminal
from pretrain.seqlen_warmup import SeqlenWarmup
from switchyard import deepspeed_compat


def device_peak_tflops(requested, precision):
    """--peak_tflops, else the known peak of this rank's GPU in the run's precision (pretrain/peak_flops.py); None on
    CPU or an unknown GPU (then MFU is not reported)."""
    if requested is not None or not torch.cuda.is_available():
        return requested
    return peak_tflops(torch.cuda.get_device_name(), precision, tf32=torch.get_float32_matmul_precision() != "highest")


def grad_norm(engine, expert_parallel_size):
    """Global gradient norm where DeepSpeed keeps none (fp32 without ZeRO), from the reduced gradients.

    Shared weights' gradients are identical on every rank; each expert's lives on world/ep ranks.
    One read of each gradient (torch._foreach_norm), no squared copy: the elementwise square().sum()
    this replaces allocated and wrote a copy of every gradient, 5% of the 125M shape's step (BENCHMARKS.md).
    Returns a 0-dim float32 tensor on the gradients' device: reading it on the host would wait for the GPU.
    """
    from deepspeed.moe.utils import is_moe_param

    params = list(engine.module.parameters())
    shared = [p.grad.detach() for p in params if p.grad is not None and not is_moe_param(p)]
    expert = [p.grad.detach() for p in params if p.grad is not None and is_moe_param(p)]
    shared, expert = sum_of_squares(shared, engine.device), sum_of_squares(expert, engine.device)
    if any(is_moe_param(p) for p in params):
        dist.all_reduce(expert)
        expert /= dist.get_world_size() // expert_parallel_size
    return (shared + expert).sqrt()


def clip_factor(norm, max_norm):
    """(max_norm / (norm + 1e-6), whether it is below 1), on ``norm``'s device, computed in float64 as Python
    computed it from the norm read to the host; the caller casts the factor to float32, as torch cast that Python
    float to multiply float32 gradients, so the clipped gradients are the same bits as before."""
    factor = torch.full((), max_norm, dtype=torch.float64, device=norm.device) / (norm.double() + 1e-6)
    return factor, factor < 1.0


# The CPU's vector norm accumulates a long tensor with an error that grows with its length (0.3% of the norm of a
# 38M-element embedding gradient, against 1e-7 for square().sum()); norms of 64K-element slices stay
# within 2e-7 of the float64 result.
CPU_NORM_CHUNK = 1 << 16


def sum_of_squares(grads, device):
    """sum of squares of every element of ``grads``, in float32, without materializing the squares."""
    if not grads:
        return torch.zeros((), device=device)
    if grads[0].device.type == "cpu":  # small gradients in one flat copy: one norm for all of them (a tiny model's many small tensors)
        small = [g.reshape(-1).float() for g in grads if g.numel() < CPU_NORM_CHUNK]
        grads = [chunk for g in grads if g.numel() >= CPU_NORM_CHUNK for chunk in g.reshape(-1).split(CPU_NORM_CHUNK)]
        grads += list(torch.cat(small).split(CPU_NORM_CHUNK)) if small else []
    return torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).square().sum()


def to_device(batch, target):
    """A task's batch (a tensor, or a dict, tuple or list of them) on ``target``: tasks build batches on the CPU."""
    if isinstance(batch, torch.Tensor):
        return batch.to(target, non_blocking=True)
    if isinstance(batch, dict):
        return {key: to_device(value, target) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(value, target) for value in batch)
    return batch


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient; nothing was saved over the last good checkpoint."""


class StopSignals:
    """SIGTERM and SIGUSR1 (Slurm's warning before the time limit) ask for a checkpoint and a clean stop.

    The handler only sets a flag; ranks agree on it at log, validation and checkpoint steps (the log step's
    all-reduce carries it, Trainer.log_train), so every rank finishes the same step before saving, whichever
    rank the signal reached first, within --log_interval steps of the signal. Not at every step: agreeing
    is a collective whose answer the host must read, a wait for the GPU at each step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def runner_terminated(self):
        """pretrain/watchdog.forward_runner_termination: the deepspeed runner was sent SIGTERM and did not pass it on."""
        self.received = "SIGTERM (to the deepspeed runner)"

    def flag(self):
        """1.0 where this rank received a signal, else 0.0, on this rank's device: summed over ranks, > 0 means stop.
        Filled there (torch.full), not copied from the host: torch.tensor(..., device=GPU) waits for the GPU."""
        return torch.full((1,), 1.0 if self.received else 0.0, device=device())

    def any_rank_received(self):
        flag = self.flag()
        dist.all_reduce(flag)
        return bool(flag.item())


class Trainer:
    def __init__(self, engine, task, plan, args, logger, flops_per_token, signals=None):
        self.engine, self.task, self.plan, self.args, self.logger = engine, task, plan, args, logger
        self.signals = signals or StopSignals()
        self.flops_per_token = flops_per_token
        self.peak = device_peak_tflops(args.peak_tflops, plan.precision)
        self.pipelined = deepspeed_compat.is_pipeline_engine(engine)
        self.dp_rank = deepspeed_compat.pipeline_data_parallel_rank(engine) if self.pipelined else plan.data_parallel_rank(dist.get_rank())
        self.step = 0
        self.consumed_samples = 0
        # Sequence-length warmup: each step's length from the schedule (the same on every rank: a function of the step).
        self.seqlen_warmup = SeqlenWarmup(plan.seqlen_warmup, task.seq_len) if plan.seqlen_warmup else None
        self.seq_len = task.seq_len  # the length the current (or last) step trains at
        self.flops_per_token_at = {task.seq_len: flops_per_token}  # attention's FLOPs grow with the length
        self.own_skipped_steps = 0  # steps skipped here where DeepSpeed has no overflow check (fp32, no ZeRO)
        self.consecutive_bad_steps = 0
        self.last_saved_step = None
        self.progress = None  # rank 0's bar or ETA while train() runs
        # fp32 without ZeRO: DeepSpeed keeps no gradient norm (it wraps the optimizer, and keeps one, only for ZeRO,
        # bf16 and fp16) and applies a non-finite step: own_step computes the norm, skips such steps and clips.
        self.computes_own_norm = plan.precision == "fp32" and plan.zero_stage == 0 and not self.pipelined
        # DeepSeek-V3's router biases move after each optimizer step, from the step's load (models/switch.py).
        model_config = None if self.pipelined else engine.module.config
        self.balances_routers = model_config is not None and family_of(model_config).experts and model_config.router_bias_rate > 0
        self.own_grad_norm = None  # own_step's last norm, a 0-dim tensor on the device
        # Unscaled gradients: without torch's GradScaler (fp16 autocast), DeepSpeed's clip can be replaced by own_step's.
        self.clips_itself = self.computes_own_norm and not deepspeed_compat.uses_autocast_grad_scaler(engine)
        if dist.get_world_size() == 1 and plan.zero_stage == 0 and not self.pipelined:
            # Alone, DeepSpeed's gradient all-reduce flattens every gradient into buckets, all-reduces them
            # with themselves and copies them back: a no-op that cost 12% of the tiny model's step (BENCHMARKS.md).
            # ZeRO 1-3 keep it: their optimizers move the gradients into their partitions there.
            deepspeed_compat.backward_allreduce_off(engine)
        if plan.precision == "fp16":
            # DeepSpeed raises at the first overflow at the minimum scale; the stop is check_bad_step's,
            # after --max_bad_steps of them, with a message that names the last good checkpoint.
            deepspeed_compat.no_error_at_min_loss_scale(engine)

    def state(self):
        return {"step": self.step, "consumed_samples": self.consumed_samples}

    def resume(self):
        state = checkpoint.load(self.engine, self.args.save_dir, universal=self.plan.resume_universal, resharded=self.plan.resume_resharded)
        self.step, self.consumed_samples = state["step"], state["consumed_samples"]
        if dist.get_rank() == 0:
            print(f"resumed from step {self.step} ({self.consumed_samples} samples consumed)", flush=True)

    def micro_batches(self):
        # Only under warmup does the task get a length: the other tasks' train_batch takes none (check_launch).
        length = {"seq_len": self.seq_len} if self.seqlen_warmup else {}
        for micro in range(self.plan.grad_accum_steps):
            batch = self.task.train_batch(self.consumed_samples, micro, self.plan.micro_batch_size, self.dp_rank, self.plan.dp_size, **length)
            yield to_device(batch, self.engine.device)

    def tokens_and_flops(self):
        """(tokens trained on in the current step, over all ranks; their training FLOPs): at its length, not the run's
        (truncated tokens are not trained on)."""
        if self.seq_len not in self.flops_per_token_at:  # warmup only, which runs no pipeline: the model is engine.module
            self.flops_per_token_at[self.seq_len] = self.engine.module.flops_per_token(self.seq_len)
        tokens = self.plan.train_batch_size * self.seq_len
        return tokens, tokens * self.flops_per_token_at[self.seq_len]

    def forward(self, batch):
        # A task's inputs are one tensor (LM) or a tuple of the model's arguments
        # (translation: src and its padding mask, tgt_in and its padding mask).
        inputs = self.task.inputs(batch)
        return self.engine(*inputs) if isinstance(inputs, tuple) else self.engine(inputs)

    def take_step(self):
        """One optimizer step on the next global batch, counted: what train() does at each step, without its logging,
        validation and checkpoints (the benchmarks time this). Returns train_step's sums."""
        if self.seqlen_warmup:
            self.seq_len = self.seqlen_warmup.length_at(self.step)
        sums = self.train_step()
        self.step += 1
        self.consumed_samples += self.plan.train_batch_size
        return sums

    def train_step(self):
        """One optimizer step on the batch at ``consumed_samples``, which it does not advance (take_step does);
        returns the sums of the logged parts over its micro-batches, on the device."""
        if self.pipelined:
            return self.pipeline_train_step()
        lm_sum, aux_sum, moe_sum = 0.0, 0.0, None
        for batch in self.micro_batches():
            outputs = self.forward(batch)
            loss, parts = self.task.loss(outputs, batch)
            self.engine.backward(loss)
            if self.engine.is_gradient_accumulation_boundary() and self.computes_own_norm:
                self.own_step()
            else:  # DeepSpeed steps the optimizer at the boundary only
                self.engine.step()
            lm_sum = lm_sum + parts["lm_loss"]
            aux_sum = aux_sum + parts["aux_loss"]
            if parts["moe"]:
                layer = torch.stack([torch.cat([s["expert_fraction"], s["dropped_fraction"].reshape(1)]) for s in parts["moe"]])
                moe_sum = layer if moe_sum is None else moe_sum + layer
        if self.balances_routers:
            self.engine.module.balance_routers()
        return lm_sum, aux_sum, moe_sum

    # own_step's one read from the device per step: what to do with the step.
    SKIP, STEP, CLIP_AND_STEP = 0, 1, 2

    def own_step(self):
        """fp32 without ZeRO: the optimizer step DeepSpeed would take, from the norm grad_norm computes, kept on the device.

        A non-finite norm skips the step (skip_optimizer_step); otherwise the gradients are clipped by DeepSpeed's
        rule (scaled by max / (norm + 1e-6) where that is below 1) instead of letting DeepSpeed compute the norm a
        second time (a further pass over every gradient, plus a multiplication of every gradient by 1.0 when
        nothing is clipped). Whether to skip must reach the host before the optimizer steps, so the host reads one
        integer per step, which also says whether the factor clips (no multiplication when it does not): one wait
        for the GPU, the least a step that may be skipped needs. The norm itself stays on the device until a log step.
        """
        norm = grad_norm(self.engine, self.plan.expert_parallel_size)
        self.own_grad_norm = norm
        max_norm = self.engine.gradient_clipping() if self.clips_itself else 0.0
        factor, clips = clip_factor(norm, max_norm) if max_norm > 0.0 else (None, False)
        action = int(torch.where(norm.isfinite(), self.STEP + clips, self.SKIP))
        if action == self.SKIP:
            self.skip_optimizer_step()
            return
        if action == self.CLIP_AND_STEP:
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            torch._foreach_mul_(grads, factor.float())
        with deepspeed_compat.gradient_clipping_off(self.engine) if self.clips_itself else contextlib.nullcontext():
            self.engine.step()

    def skip_optimizer_step(self):
        """DeepSpeed skips non-finite steps itself under ZeRO and fp16; without ZeRO in fp32 it would apply
        them. Drop the gradients instead: the optimizer leaves parameters without a gradient untouched.
        Clipping is off for this one step because DeepSpeed's clip fails on a model with no gradients."""
        self.engine.zero_grad()
        with deepspeed_compat.gradient_clipping_off(self.engine):
            self.engine.step()
        self.own_skipped_steps += 1

    def pipeline_train_step(self):
        """train_batch pulls this rank's micro-batches as (inputs, targets), runs the pipeline schedule and
        steps; it returns the loss averaged over micro-batches and data-parallel ranks, on every stage
        (DeepSpeed broadcasts it from the last). log_train averages sums over ranks and micro-batches:
        grad_accum_steps times that mean is such a sum."""
        batches = ((self.task.inputs(b), self.task.targets(b)) for b in self.micro_batches())
        loss = self.engine.train_batch(data_iter=batches).float()  # stays on the device, for log_train's all-reduce
        return loss * self.plan.grad_accum_steps, torch.zeros_like(loss), None

    def skipped_steps(self):
        return deepspeed_compat.skipped_steps(self.engine) + self.own_skipped_steps

    def save(self):
        """Checkpoint this step, unless it ends a run of skipped steps: nothing is saved over the last good one."""
        if self.consecutive_bad_steps:
            return
        checkpoint.save(self.engine, self.args.save_dir, self.step, self.state(), self.plan.dp_size, self.args.keep_checkpoints)
        self.last_saved_step = self.step

    def check_bad_step(self, skipped_before):
        """Log a skipped step; count consecutive bad ones and stop past --max_bad_steps.

        A bad step is a skipped one (non-finite loss or gradients); in fp16 only a skip with the loss
        scale already at its minimum, since lowering the scale through overflows is normal.
        """
        skipped = self.skipped_steps() > skipped_before
        why = "non-finite loss or gradient norm"
        bad = skipped
        if self.plan.precision == "fp16":
            scale = deepspeed_compat.loss_scale(self.engine)
            floor = deepspeed_compat.min_loss_scale(self.engine)
            why = f"fp16 overflow, loss scale {scale:g}, minimum {floor:g}"
            bad = skipped and scale <= floor
        if skipped and dist.get_rank() == 0:
            self.progress.write(f"step {self.step} skipped ({why})")
        self.consecutive_bad_steps = self.consecutive_bad_steps + 1 if bad else 0
        if self.consecutive_bad_steps < self.args.max_bad_steps:
            return
        last = f"step {self.last_saved_step}" if self.last_saved_step else "none saved by this run"
        raise TrainingDiverged(
            f"stopping at step {self.step}: {self.consecutive_bad_steps} consecutive steps skipped ({why}); "
            f"last good checkpoint: {last}; lower the learning rate, check the data, or resume from it"
        )

    def train(self):
        """Train to --max_steps; returns "done", or the signal's name after a stop signal (checkpoint saved)."""
        self.progress = Progress(self.step, self.args.max_steps, terminal() if dist.get_rank() == 0 else None)
        self.logger.progress = self.progress
        try:
            return self.train_to_max_steps()
        finally:
            self.progress.close()
            self.logger.progress = None

    def train_to_max_steps(self):
        args = self.args
        signals = self.signals
        window_start, window_steps, window_tokens, window_flops = time.perf_counter(), 0, 0, 0
        sums = None
        while self.step < args.max_steps:
            skipped_before = self.skipped_steps()
            lm_sum, aux_sum, moe_sum = self.take_step()
            window_steps += 1
            tokens, flops = self.tokens_and_flops()
            window_tokens, window_flops = window_tokens + tokens, window_flops + flops
            self.progress.advance(self.step)
            step_sums = torch.stack([torch.as_tensor(lm_sum, dtype=torch.float32), torch.as_tensor(aux_sum, dtype=torch.float32)])
            if moe_sum is not None:
                step_sums = torch.cat([step_sums, moe_sum.flatten()])
            sums = step_sums if sums is None else sums + step_sums
            log_now = self.step % args.log_interval == 0 or self.step == args.max_steps
            stop = False
            if log_now:
                elapsed = time.perf_counter() - window_start
                stop = self.log_train(sums, window_steps, elapsed, moe_sum, window_tokens, window_flops)
                window_start, window_steps, window_tokens, window_flops, sums = time.perf_counter(), 0, 0, 0, None
            self.check_bad_step(skipped_before)
            eval_now = args.eval_interval and self.step % args.eval_interval == 0
            save_now = args.save_interval and self.step % args.save_interval == 0
            if eval_now:
                self.validate()
            if not log_now and (eval_now or save_now):  # these steps wait for the device anyway: agree on a signal too
                stop = signals.any_rank_received()
            if stop:
                self.save()
                if dist.get_rank() == 0:
                    self.progress.write(
                        f"stop signal ({signals.received or 'on another rank'}) at step {self.step}: "
                        f"checkpoint {self.last_saved_step} is the one to resume from; exiting for requeue"
                    )
                return signals.received or "signal"
            if save_now:
                self.save()
        if not args.eval_interval or self.step % args.eval_interval:
            self.validate()
        if self.last_saved_step != self.step:
            self.save()
        return "done"

    def log_train(self, sums, steps, elapsed, last_moe, tokens, flops):
        """Log the means over ranks and the window's ``steps`` of the logged parts, and its speed from the ``tokens``
        all ranks trained on in it and their ``flops``; returns whether any rank received a stop signal. The log
        step's one wait for the device: one all-reduce of every rank's sums and stop flag, and one read of its result
        together with the gradient norm."""
        reduced = torch.cat([sums, self.signals.flag()])
        dist.all_reduce(reduced)
        parts = [reduced[:-1] / (dist.get_world_size() * steps * self.plan.grad_accum_steps), reduced[-1:]]
        norm = self.grad_norm_to_log(sums.device)
        values = torch.cat(parts if norm is None else [*parts, norm]).tolist()
        means, stop = values[: len(sums)], values[len(sums)] > 0
        tokens_per_s = tokens / elapsed
        metrics = {
            "train/loss": means[0] + means[1],
            "train/lm_loss": means[0],
            "train/lr": self.engine.get_lr()[0],
        }
        if norm is not None:
            metrics["train/grad_norm"] = values[-1]
        if self.seqlen_warmup:
            metrics["train/seq_len"] = self.seq_len  # the window's last step's
        metrics.update({"perf/step_time_s": elapsed / steps, "perf/tokens_per_s": tokens_per_s})
        histograms = {}
        if last_moe is not None:
            metrics["train/aux_loss"] = means[1]
            n_layers, width = last_moe.shape
            for layer in range(n_layers):
                row = means[2 + layer * width : 2 + (layer + 1) * width]
                metrics[f"moe/layer{layer}/dropped_fraction"] = row[-1]
                metrics[f"moe/layer{layer}/max_expert_fraction"] = max(row[:-1])
                histograms[f"moe/layer{layer}/expert_fraction"] = row[:-1]
        metrics["train/skipped_steps"] = float(self.skipped_steps())
        if self.plan.precision == "fp16":
            metrics["train/loss_scale"] = deepspeed_compat.loss_scale(self.engine)
        if self.peak:
            metrics["perf/mfu"] = flops / elapsed / dist.get_world_size() / (self.peak * 1e12)
        self.logger.log(self.step, metrics, histograms)
        return stop

    def grad_norm_to_log(self, target):
        """The last step's gradient norm as a 1-element float32 tensor on ``target``, not read yet; None where there is
        none (a pipeline in fp32 without ZeRO, ZeRO with compute_grad_norm off). DeepSpeed's is a tensor, or a
        Python float (inf after an overflow): that one is filled on the device, not copied (a blocking copy waits)."""
        norm = self.own_grad_norm if self.computes_own_norm else self.engine.get_global_grad_norm()
        if norm is None:
            return None
        if not isinstance(norm, torch.Tensor):
            return torch.full((1,), float(norm), device=target)
        return norm.detach().reshape(1).float().to(target, non_blocking=True)

    @torch.no_grad()
    def validate(self):
        """val/loss on the task's validation data, and whatever the task's optional ``validation_metrics(model)``
        measures with the model itself (translation's val/bleu); every rank calls it, for collectives inside."""
        metrics = {}
        batches = (
            []
            if self.task.val is None
            else [self.task.val_batch(i, self.plan.micro_batch_size, self.dp_rank, self.plan.dp_size) for i in range(self.args.eval_iters)]
        )
        if self.pipelined:  # mean over micro-batches and data-parallel ranks, on every stage
            if batches:
                loss = self.engine.eval_batch(((self.task.inputs(b), self.task.targets(b)) for b in batches), num_micro_batches=len(batches))
                self.logger.log(self.step, {"val/loss": float(loss)})
            return
        self.engine.eval()
        if batches:
            total = torch.zeros(2, device=self.engine.device)
            for batch in batches:
                batch = to_device(batch, self.engine.device)
                _, parts = self.task.loss(self.forward(batch), batch)
                total += torch.stack([parts["lm_loss"].float(), torch.ones((), device=self.engine.device)])
            dist.all_reduce(total)
            metrics["val/loss"] = (total[0] / total[1]).item()
        if hasattr(self.task, "validation_metrics"):
            metrics.update(self.task.validation_metrics(self.engine.module))
        self.engine.train()
        if metrics:
            self.logger.log(self.step, metrics)
