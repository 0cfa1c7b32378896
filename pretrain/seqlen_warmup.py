"""Sequence-length warmup (Li, Zhang and He, 2022, "The Stability-Efficiency Dilemma: Investigating Sequence Length
Warmup for Training GPT Models"): the first steps train on short sequences, the length rising to the full one.

Configured in the DeepSpeed JSON as Switchyard's own section, in the keys of DeepSpeed's CurriculumScheduler
(deepspeed/runtime/data_pipeline/curriculum_scheduler.py), which computes the length:

    "seqlen_warmup": {"min_difficulty": 8, "max_difficulty": "auto", "schedule_type": "fixed_linear",
                      "schedule_config": {"total_curriculum_step": 200, "difficulty_step": 8}}

DeepSpeed 0.19 removed the top-level ``curriculum_learning`` key that did this inside its engine (and its
``data_efficiency`` curriculum works through DeepSpeed's own data loader only: pretrain/ds_config.py refuses both).
Here the trainer truncates each batch: every sample keeps its first L tokens (the paper's truncation form), so a
step still consumes the same samples and the data position, and so a resume, is the one without warmup. The
length is a function of the step alone, which is all a resume needs.
"""

from switchyard.errors import ConfigError

SECTION = "seqlen_warmup"
AUTO = "auto"  # max_difficulty: the run's sequence length (--seq_len, else the model's max_seq_len)
# schedule_type -> the schedule_config keys CurriculumScheduler reads for it. fixed_discrete (explicit lengths and
# steps) and custom (a function registered on DeepSpeed's engine) are not offered: the first has nothing to check
# the lengths against here, the second no place in a JSON file.
SCHEDULE_KEYS = {
    "fixed_linear": ("total_curriculum_step", "difficulty_step"),
    "fixed_root": ("total_curriculum_step", "difficulty_step", "root_degree"),
}
KEYS = {
    "min_difficulty": "the first steps' sequence length",
    "max_difficulty": 'the length the warmup ends at: the run\'s sequence length ("auto" says so)',
    "schedule_type": "fixed_linear or fixed_root (CurriculumScheduler's)",
    "schedule_config": "total_curriculum_step, difficulty_step (and root_degree for fixed_root)",
}


def _positive_int(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_section(config, path):
    """The section's values, before anything is built (plan_launch calls it); returns the section or None.
    What the run's sequence length decides (max_difficulty) is check_length's, once the task knows it."""
    section = config.get(SECTION)
    if section is None:
        return None
    where = f"DeepSpeed config {path}: {SECTION}"
    missing = [key for key in KEYS if key not in section]
    if missing:
        raise ConfigError(f"{where} needs {', '.join(missing)}; e.g. {SECTION} in ds_configs/seqlen_warmup.json")
    kind = section["schedule_type"]
    if kind not in SCHEDULE_KEYS:
        raise ConfigError(f"{where}.schedule_type must be one of {', '.join(SCHEDULE_KEYS)}, got {kind!r}")
    schedule = section["schedule_config"]
    if not isinstance(schedule, dict):
        raise ConfigError(f"{where}.schedule_config must be a JSON object, got {schedule!r}")
    wanted = SCHEDULE_KEYS[kind]
    for key in schedule:
        if key not in wanted:
            raise ConfigError(f"{where}.schedule_config.{key} is not read by the {kind} schedule; it takes {', '.join(wanted)}")
    for key in wanted:
        if not _positive_int(schedule.get(key)):
            raise ConfigError(f"{where}.schedule_config.{key} must be a positive integer, got {schedule.get(key)!r}")
    low, high, step = section["min_difficulty"], section["max_difficulty"], schedule["difficulty_step"]
    if not _positive_int(low):
        raise ConfigError(f"{where}.min_difficulty must be a positive integer (tokens), got {low!r}")
    if high != AUTO and not _positive_int(high):
        raise ConfigError(f'{where}.max_difficulty must be a positive integer (tokens) or "auto" (the run\'s sequence length), got {high!r}')
    # CurriculumScheduler floors each length to a multiple of difficulty_step and never past max_difficulty: a step
    # that does not divide the maximum would end the warmup short of it and train there for the rest of the run.
    if low % step:
        raise ConfigError(f"{where}: difficulty_step {step} does not divide min_difficulty {low}; set min_difficulty to a multiple of {step}")
    if high != AUTO and high % step:
        raise ConfigError(f"{where}: difficulty_step {step} does not divide max_difficulty {high}; pick a difficulty_step that divides it")
    if high != AUTO and low > high:
        raise ConfigError(f"{where}: min_difficulty {low} is above max_difficulty {high}; the warmup rises from min to max")
    return section


def check_launch(section, path, plan, task_name, task_class):
    """What the launch cannot truncate: pipeline stages (DeepSpeed's pipeline engine fixes the activations' shape at
    its first batch), tasks whose batches are not token windows (translation's padded pairs, distillation), and
    lengths a sequence-parallel group cannot split evenly (every scheduled length is a multiple of difficulty_step)."""
    where = f"DeepSpeed config {path}: {SECTION}"
    step = section["schedule_config"]["difficulty_step"]
    if plan.sequence_parallel_size > 1 and step % plan.sequence_parallel_size:
        raise ConfigError(
            f"{where}: difficulty_step {step} is not a multiple of the sequence-parallel size {plan.sequence_parallel_size}, "
            f"so some warmup lengths would not split over its ranks; make difficulty_step a multiple of it"
        )
    if plan.pipeline_stages > 1:
        raise ConfigError(
            f"{where} needs batches of a changing shape, and DeepSpeed's pipeline engine fixes the shape of the activations "
            f"it passes between stages at its first batch; drop {SECTION} or 'pipeline' from the config"
        )
    if not getattr(task_class, "supports_seqlen_warmup", False):
        raise ConfigError(
            f"{where} truncates the token windows of --task lm; --task {task_name} trains on other batches "
            f"(translation: padded sentence pairs), which it does not apply to: drop {SECTION} from the config"
        )


def check_length(section, path, seq_len):
    """max_difficulty against the run's sequence length ``seq_len``: the samples are seq_len tokens long (a longer
    length cannot be cut from them), and a warmup that ended below it would cut every sample for good."""
    high = section["max_difficulty"]
    if high == AUTO:
        step = section["schedule_config"]["difficulty_step"]
        if seq_len % step or section["min_difficulty"] > seq_len:
            raise ConfigError(
                f'DeepSpeed config {path}: {SECTION}: the run\'s sequence length {seq_len} (max_difficulty "auto") is not a multiple '
                f"of difficulty_step {step} at or above min_difficulty {section['min_difficulty']}; change difficulty_step or --seq_len"
            )
        return
    if high != seq_len:
        longer = (
            f"above the run's sequence length {seq_len} (the samples' length)" if high > seq_len else f"below the run's sequence length {seq_len}"
        )
        raise ConfigError(
            f'DeepSpeed config {path}: {SECTION}.max_difficulty {high} is {longer}; the warmup ends at the full length: set it to {seq_len} or "auto"'
        )


class SeqlenWarmup:
    """The training sequence length at each step, from DeepSpeed's CurriculumScheduler."""

    def __init__(self, section, seq_len):
        from deepspeed.runtime.data_pipeline.curriculum_scheduler import CurriculumScheduler

        high = seq_len if section["max_difficulty"] == AUTO else section["max_difficulty"]
        self.scheduler = CurriculumScheduler({**section, "max_difficulty": high})

    def length_at(self, step):
        """The length of the step after ``step`` completed ones: DeepSpeed's engine asked for global_steps + 1, and
        Megatron-DeepSpeed's loop for iteration + 1. get_difficulty, not update_difficulty: a pure function of the
        step, so a resumed run gets the same lengths without the scheduler's state in the checkpoint."""
        return self.scheduler.get_difficulty(step + 1)
