"""Bad input is refused at start with one line on stderr, exit code 2, no traceback, no model built."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.distributed import CORPUS, MAIN, REPO

DS = REPO / "ds_configs"
MODELS = REPO / "models" / "configs"


def write(path, content):
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def ds_with(tmp_path, **over):
    config = json.loads((DS / "zero1.json").read_text())
    config.update(over)
    return write(tmp_path / "ds.json", config)


def model_with(tmp_path, base="tiny-gpt.json", **over):
    config = json.loads((MODELS / base).read_text())
    config.update(over)
    return write(tmp_path / "model.json", config)


# name -> (function of tmp_path returning (ds_config, model_config, extra args, world size), expected text)
CASES = {
    "malformed ds json": (lambda t: (write(t / "ds.json", '{"train_batch_size": 8,'), MODELS / "tiny-gpt.json", [], 1), "is not valid JSON (line 1"),
    "missing ds config": (lambda t: (t / "nope.json", MODELS / "tiny-gpt.json", [], 1), "does not exist"),
    "malformed model json": (lambda t: (DS / "zero1.json", write(t / "m.json", "{family: gpt}"), [], 1), "is not valid JSON"),
    "unknown model key": (lambda t: (DS / "zero1.json", model_with(t, n_layer=2), [], 1), "unknown key 'n_layer' (did you mean 'n_layers'?)"),
    "wrong model type": (lambda t: (DS / "zero1.json", model_with(t, d_model="64"), [], 1), "'d_model' must be int"),
    "heads do not divide": (lambda t: (DS / "zero1.json", model_with(t, n_heads=5), [], 1), "must be divisible by n_heads"),
    "unknown family": (lambda t: (DS / "zero1.json", model_with(t, family="gtp"), [], 1), "did you mean 'gpt'"),
    "ep size in model file": (lambda t: (DS / "zero1.json", model_with(t, "tiny-switch.json", expert_parallel_size=2), [], 1), "is set at launch"),
    "world size cannot divide batch": (
        lambda t: (DS / "zero1.json", MODELS / "tiny-gpt.json", [], 3),
        "train_batch_size 8 is not divisible by train_micro_batch_size_per_gpu 2 x 3",
    ),
    "fp16 and bf16": (
        lambda t: (ds_with(t, fp16={"enabled": True}, bf16={"enabled": True}), MODELS / "tiny-gpt.json", [], 1),
        "enables both fp16 and bf16",
    ),
    "sequence parallelism through DeepSpeed's mesh": (
        lambda t: (ds_with(t, sequence_parallel_size=2, data_parallel_size=1), MODELS / "tiny-gpt.json", [], 2),
        "never reduces gradients across sequence-parallel ranks",
    ),
    "sequence parallelism of a family without it": (
        lambda t: (DS / "ulysses2_zero1.json", MODELS / "tiny-switch.json", [], 2),
        "needs a family whose attention splits sequences",
    ),
    "pipeline with zero2": (
        lambda t: (ds_with(t, pipeline={"stages": 2}, zero_optimization={"stage": 2}), MODELS / "tiny-gpt.json", [], 2),
        "ZeRO stage 0 or 1 only",
    ),
    "pipeline with switch": (
        lambda t: (ds_with(t, pipeline={"stages": 2}), MODELS / "tiny-switch.json", [], 2),
        "pipeline stages need a family with a pipeline form ('gpt'); use a config without 'pipeline' for a 'switch' model",
    ),
    # The Llama families register no pipeline form (models/llama.py): refused through the registration too.
    "pipeline with llama": (
        lambda t: (ds_with(t, pipeline={"stages": 2}), MODELS / "tiny-llama.json", [], 2),
        "pipeline stages need a family with a pipeline form ('gpt'); use a config without 'pipeline' for a 'llama' model",
    ),
    "llama_moe with zero3": (
        lambda t: (DS / "zero3.json", MODELS / "tiny-llama-moe.json", [], 1),
        "does not run under ZeRO-3 (it points to AutoEP, which needs a Hugging Face model); use ZeRO stage 0, 1 or 2 for a 'llama_moe' model",
    ),
    # The Switch encoder-decoder: refused through its registration (experts=True), as the Switch LM is.
    "switch encoder-decoder with zero3": (
        lambda t: (DS / "zero3.json", MODELS / "tiny-switch-transformer.json", ["--task", "translation"], 1),
        "does not run under ZeRO-3 (it points to AutoEP, which needs a Hugging Face model); "
        "use ZeRO stage 0, 1 or 2 for a 'switch-transformer' model",
    ),
    "switch encoder-decoder ep does not divide experts": (
        lambda t: (
            ds_with(t, moe={"expert_parallel_size": 3}, train_batch_size=6),
            MODELS / "tiny-switch-transformer.json",
            ["--task", "translation"],
            3,
        ),
        "does not divide num_experts 4",
    ),
    "switch encoder-decoder ep does not divide world": (
        lambda t: (DS / "moe_ep2_zero2.json", MODELS / "tiny-switch-transformer.json", ["--task", "translation"], 1),
        "does not divide the world size 1",
    ),
    "pipeline stages vs world": (lambda t: (ds_with(t, pipeline={"stages": 2}), MODELS / "tiny-gpt.json", [], 3), "do not divide the world size 3"),
    "switch with zero3": (lambda t: (DS / "zero3.json", MODELS / "tiny-switch.json", [], 1), "does not run under ZeRO-3"),
    "ep does not divide world": (lambda t: (DS / "moe_ep2_zero2.json", MODELS / "tiny-switch.json", [], 1), "does not divide the world size 1"),
    "ep does not divide experts": (
        lambda t: (ds_with(t, moe={"expert_parallel_size": 3}, train_batch_size=6), MODELS / "tiny-switch.json", [], 3),
        "does not divide num_experts 4",
    ),
    "bad zero stage": (lambda t: (ds_with(t, zero_optimization={"stage": 4}), MODELS / "tiny-gpt.json", [], 1), "must be 0, 1, 2 or 3"),
    "no batch size": (
        lambda t: (write(t / "ds.json", {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}), MODELS / "tiny-gpt.json", [], 1),
        "sets neither train_batch_size",
    ),
    "missing train data": (lambda t: (DS / "zero1.json", MODELS / "tiny-gpt.json", ["--train_data", t / "none.txt"], 1), "--train_data"),
    "bad flag": (lambda t: (DS / "zero1.json", MODELS / "tiny-gpt.json", ["--zero_stage", "2"], 1), "unrecognized arguments"),
    "resume without checkpoint": (lambda t: (DS / "zero1.json", MODELS / "tiny-gpt.json", ["--resume"], 1), "holds no checkpoint"),
    "tokenizer does not fit model": (lambda t: (DS / "zero1.json", model_with(t, vocab_size=200), [], 1), "tokenizer has 257 ids but model config"),
    "zero max steps": (lambda t: (DS / "zero1.json", MODELS / "tiny-gpt.json", ["--max_steps", "0"], 1), "--max_steps must be >= 1"),
    "val fraction out of range": (
        lambda t: (DS / "zero1.json", MODELS / "tiny-gpt.json", ["--val_fraction", "1.5"], 1),
        "--val_fraction must be in [0, 1)",
    ),
    "non-numeric flag": (lambda t: (DS / "zero1.json", MODELS / "tiny-gpt.json", ["--save_interval", "often"], 1), "invalid int value"),
    "negative keep": (lambda t: (DS / "zero1.json", MODELS / "tiny-gpt.json", ["--keep_checkpoints", "-1"], 1), "--keep_checkpoints must be >= 0"),
    "unknown task": (lambda t: (DS / "zero1.json", MODELS / "tiny-gpt.json", ["--task", "lmm"], 1), "unknown --task 'lmm'"),
    "moe layer out of range": (
        lambda t: (DS / "zero1.json", model_with(t, "tiny-switch.json", moe_layers=[5]), [], 1),
        "moe_layers [5] out of range",
    ),
    "negative capacity": (
        lambda t: (DS / "zero1.json", model_with(t, "tiny-switch.json", capacity_factor=-1.0), [], 1),
        "capacity_factor and eval_capacity_factor must be positive",
    ),
    "expert dropout too high": (
        lambda t: (DS / "zero1.json", model_with(t, "tiny-switch.json", expert_dropout=1.0), [], 1),
        "expert_dropout must be in [0, 1)",
    ),
    "moe layers not a list": (
        lambda t: (DS / "zero1.json", model_with(t, "tiny-switch.json", moe_layers="odd"), [], 1),
        "'moe_layers' must be a list of int",
    ),
    "switch key on dense model": (lambda t: (DS / "zero1.json", model_with(t, num_experts=8), [], 1), "unknown key 'num_experts'"),
    "ds config not an object": (lambda t: (write(t / "ds.json", "[1, 2]"), MODELS / "tiny-gpt.json", [], 1), "must be a JSON object"),
    "micro batch not an int": (
        lambda t: (ds_with(t, train_micro_batch_size_per_gpu=1.5), MODELS / "tiny-gpt.json", [], 1),
        "train_micro_batch_size_per_gpu must be a positive integer",
    ),
    "inconsistent batch triple": (
        lambda t: (ds_with(t, gradient_accumulation_steps=3), MODELS / "tiny-gpt.json", [], 1),
        "train_batch_size 8 != train_micro_batch_size_per_gpu 2 x gradient_accumulation_steps 3",
    ),
    "seq len longer than data": (
        lambda t: (DS / "zero1.json", MODELS / "tiny-gpt.json", ["--train_data", write(t / "short.txt", "tiny corpus")], 1),
        "fewer than one sample",
    ),
    "empty data file": (lambda t: (DS / "zero1.json", MODELS / "tiny-gpt.json", ["--train_data", write(t / "e.txt", "")], 1), "is empty"),
    "non utf8 data": (
        lambda t: (DS / "zero1.json", MODELS / "tiny-gpt.json", ["--train_data", write(t / "b.txt", b"ok\n\xff\xfe\n")], 1),
        "line 2 is not UTF-8",
    ),
    "blend weights count mismatch": (
        lambda t: (DS / "zero1.json", MODELS / "tiny-gpt.json", ["--train_data", CORPUS, CORPUS, "--train_data_weights", "0.5"], 1),
        "--train_data_weights has 1 weights for 2 --train_data corpora",
    ),
    "negative blend weight": (
        lambda t: (DS / "zero1.json", MODELS / "tiny-gpt.json", ["--train_data", CORPUS, CORPUS, "--train_data_weights", "0.5", "-0.2"], 1),
        "must all be positive and finite",
    ),
    "bleu on a language model": (
        lambda t: (DS / "zero1.json", MODELS / "tiny-gpt.json", ["--bleu_src", CORPUS, "--bleu_ref", CORPUS], 1),
        "drop --bleu_src/--bleu_ref",
    ),
    "bleu ref without src": (
        lambda t: (DS / "zero1.json", MODELS / "tiny-gpt.json", ["--bleu_ref", CORPUS], 1),
        "--bleu_src and --bleu_ref go together",
    ),
    "fp16 on a device without it": (
        lambda t: (DS / "fp16_zero1.json", MODELS / "tiny-gpt.json", [], 1),
        "enables fp16, which this device (cpu) does not support",
    ),
    "seq len beyond learned positions": (
        lambda t: (DS / "zero1.json", MODELS / "tiny-gpt.json", ["--seq_len", "65"], 1),
        "--seq_len 65 is longer than the 64 learned positions",
    ),
    "lm task with an encoder-decoder": (
        lambda t: (DS / "zero1.json", MODELS / "tiny-transformer.json", [], 1),
        "needs a decoder model (family 'gpt' or 'llama' or 'llama_moe' or 'switch'); this one is a 'transformer'",
    ),
    "extend schedule without resume": (
        lambda t: (DS / "zero1.json", MODELS / "tiny-gpt.json", ["--extend_schedule"], 1),
        "--extend_schedule stretches a resumed run's learning-rate schedule; pass it with --resume",
    ),
    "zero++ qwz on the cpu": (
        lambda t: (ds_with(t, zero_optimization={"stage": 3, "zero_quantized_weights": True}), MODELS / "tiny-gpt.json", [], 1),
        "zero_optimization.zero_quantized_weights (ZeRO++ qwZ) quantizes with DeepSpeed's CUDA kernels, which the cpu does not have",
    ),
    "zero++ qgz on the cpu": (
        lambda t: (ds_with(t, zero_optimization={"stage": 3, "zero_quantized_gradients": True}), MODELS / "tiny-gpt.json", [], 1),
        "zero_optimization.zero_quantized_gradients (ZeRO++ qgZ) quantizes with DeepSpeed's CUDA kernels",
    ),
    "twin-flow below zero-3": (
        lambda t: (ds_with(t, zero_optimization={"stage": 2, "offload_optimizer": {"device": "cpu", "ratio": 0.3}}), MODELS / "tiny-gpt.json", [], 1),
        # DeepSpeed's own config model refuses it (pretrain/ds_schema.py reports its validator's line)
        "zero_optimization: Partial offloading only supported for ZeRO Stage 3.",
    ),
    "data efficiency and random-ltd": (
        lambda t: (
            ds_with(t, data_efficiency={"enabled": True, "data_routing": {"enabled": True, "random_ltd": {"enabled": True}}}),
            MODELS / "tiny-gpt.json",
            [],
            1,
        ),
        "data_efficiency (DeepSpeed's curriculum data sampling and random-LTD) works only with DeepSpeed's own data loader",
    ),
    "deepspeed's removed curriculum_learning": (
        lambda t: (ds_with(t, curriculum_learning={"enabled": True, "curriculum_type": "seqlen"}), MODELS / "tiny-gpt.json", [], 1),
        "'curriculum_learning': DeepSpeed 0.19 removed it; for sequence-length warmup write the schedule as \"seqlen_warmup\"",
    ),
    "seqlen warmup past the samples' length": (
        lambda t: (
            ds_with(
                t,
                seqlen_warmup={
                    "min_difficulty": 8,
                    "max_difficulty": 128,
                    "schedule_type": "fixed_linear",
                    "schedule_config": {"total_curriculum_step": 20, "difficulty_step": 8},
                },
            ),
            MODELS / "tiny-gpt.json",
            [],
            1,
        ),
        "seqlen_warmup.max_difficulty 128 is above the run's sequence length 64",
    ),
    "activation checkpointing section without checkpointed blocks": (
        lambda t: (DS / "zero1_activation_checkpointing.json", MODELS / "tiny-gpt.json", [], 1),
        "activation_checkpointing configures how checkpointed blocks are recomputed, and the model checkpoints none",
    ),
    "activation checkpoints offloaded on the cpu": (
        lambda t: (ds_with(t, activation_checkpointing={"cpu_checkpointing": True}), model_with(t, checkpoint_activations=1), [], 1),
        "activation_checkpointing.cpu_checkpointing moves checkpoints from an accelerator to host memory; on the cpu",
    ),
    "nvme offload into a missing directory": (
        lambda t: (
            ds_with(
                t,
                zero_optimization={"stage": 3, "offload_param": {"device": "nvme", "nvme_path": str(t / "no-drive"), "pin_memory": True}},
            ),
            MODELS / "tiny-gpt.json",
            [],
            1,
        ),
        "no-drive is not a directory; create it on the NVMe drive (its mount point) or point nvme_path at one",
    ),
    "missing second blend corpus": (
        lambda t: (DS / "zero1.json", MODELS / "tiny-gpt.json", ["--train_data", CORPUS, t / "none.txt"], 1),
        "none.txt does not exist",
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_refused_with_one_line(tmp_path, name):
    make, expected = CASES[name]
    ds_config, model_config, extra, world = make(tmp_path)
    args = [
        "--ds_config",
        ds_config,
        "--model_config",
        model_config,
        "--train_data",
        CORPUS,
        "--max_steps",
        2,
        "--save_dir",
        tmp_path / "run",
        *extra,
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["WORLD_SIZE"] = str(world)
    env["TORCH_EXTENSIONS_DIR"] = env.get("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    proc = subprocess.run([sys.executable, str(MAIN), *map(str, args)], env=env, capture_output=True, text=True, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "run" / "latest").exists()


def test_rendezvous_port_in_use_is_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = dict(
            os.environ,
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions")),
        )
        proc = subprocess.run(
            [
                sys.executable,
                str(MAIN),
                "--ds_config",
                DS / "zero0.json",
                "--model_config",
                MODELS / "tiny-gpt.json",
                "--train_data",
                CORPUS,
                "--max_steps",
                "1",
                "--save_dir",
                tmp_path / "run",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert errors == [
        f"error: the rendezvous port {port} on 127.0.0.1 is in use by another process; pick a free one (deepspeed --master_port P, or MASTER_PORT=P)"
    ]


def test_ctrl_c_is_one_line_naming_the_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    args = [
        "--ds_config",
        DS / "zero0.json",
        "--model_config",
        MODELS / "tiny-gpt.json",
        "--train_data",
        CORPUS,
        "--max_steps",
        "100000",
        "--save_interval",
        "2",
        "--save_dir",
        run,
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    # Ctrl-C's SIGINT handled as in a terminal's foreground job, also when the suite itself runs in a background
    # job of a non-interactive shell (which starts it, and so this process, with SIGINT ignored).
    proc = subprocess.Popen(
        [sys.executable, str(MAIN), *map(str, args)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 300  # a loaded machine can take minutes to the first save
        while not (run / "latest").exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    assert len(errors) == 1 and errors[0].startswith(f"error: interrupted (Ctrl-C); the last complete checkpoint is {run}/global_step")
    assert errors[0].endswith(": continue with --resume") and not (run / "run.lock").exists()
