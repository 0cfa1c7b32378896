"""python -m eval.harness: lm-eval's figures on local tasks equal the sums of token log-probabilities computed here
with the model, and equal lm-eval's own hf model's on the transformers export."""

import glob
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance

from eval.harness import SwitchyardLM
from eval.perplexity import nll_sums, windows
from pretrain.run_dir import load_model
from tests.distributed import CORPUS, REPO

# Task data come through datasets, and lm-eval's hf model through transformers: both would otherwise ask the hub
# (for dataset scripts, metadata, a model id) and a test must neither wait on nor depend on the network.
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

QUESTIONS = [
    ("Who is speaking, First Citizen or", ["Second Citizen", "the moon", "MENENIUS"], 0),
    ("Before we proceed any further, hear me", ["speak", "jump", "xylophone"], 0),
    ("You are all resolved rather to die than to", ["famish", "sing", "qqq"], 0),
    ("We know it, we", ["know't", "danced", "zebra"], 1),
    ("Let us kill him, and we'll have corn at our own", ["price", "houses", "Tuesdays"], 2),
]
PROMPTS = ["First Citizen:\nBefore we", "All:\nSpeak,", "MENENIUS:\nWhat work's, my"]


def write_tasks(directory):
    """Three local tasks over JSON Lines files: multiple choice, perplexity (documents longer and shorter than the
    model's 64 positions) and greedy generation."""
    with open(directory / "mc.jsonl", "w") as f:
        for question, choices, gold in QUESTIONS:
            f.write(json.dumps({"question": question, "choices": choices, "gold": gold}) + "\n")
    documents = [d for d in CORPUS.read_text().split("\n\n") if d.strip()]
    with open(directory / "ppl.jsonl", "w") as f:
        for text in documents[:3] + [d for d in documents if len(d) > 300][:2]:
            f.write(json.dumps({"text": text}) + "\n")
    with open(directory / "gen.jsonl", "w") as f:
        for prompt in PROMPTS:
            f.write(json.dumps({"prompt": prompt, "answer": "speak"}) + "\n")
    common = "dataset_path: json\ntest_split: train\n"
    (directory / "mc.yaml").write_text(
        f"task: tiny_mc\n{common}dataset_kwargs:\n  data_files: {{train: {directory / 'mc.jsonl'}}}\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{gold}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (directory / "ppl.yaml").write_text(
        f"task: tiny_ppl\n{common}dataset_kwargs:\n  data_files: {{train: {directory / 'ppl.jsonl'}}}\noutput_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
    )
    (directory / "gen.yaml").write_text(
        f"task: tiny_gen\n{common}dataset_kwargs:\n  data_files: {{train: {directory / 'gen.jsonl'}}}\noutput_type: generate_until\n"
        'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 12\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n"
    )
    return [json.loads(line)["text"] for line in (directory / "ppl.jsonl").read_text().splitlines()]


def harness(*args):
    proc = subprocess.run(
        [sys.executable, "-m", "eval.harness", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, **OFFLINE}
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")] if proc.returncode == 0 else []
    return proc, {line["task"]: line for line in lines}


def continuation_log_prob(model, tokenizer, context, continuation):
    """log P(continuation | context) in one forward pass, from the log-softmax by hand."""
    ids = tokenizer.encode(context + continuation)
    start = len(tokenizer.encode(context))
    with torch.no_grad():
        log_probs = F.log_softmax(model(torch.tensor([ids[:-1]]))[0][0].float(), dim=-1)
    return sum(log_probs[i - 1, ids[i]].item() for i in range(start, len(ids)))


def expected_multiple_choice(model, tokenizer):
    acc, acc_norm = [], []
    for question, choices, gold in QUESTIONS:
        scores = [continuation_log_prob(model, tokenizer, question, " " + choice) for choice in choices]  # lm-eval's " " delimiter
        acc.append(int(np.argmax(scores)) == gold)
        # lm-eval divides by the choice's length in characters, without the delimiter
        acc_norm.append(int(np.argmax([s / len(c) for s, c in zip(scores, choices)])) == gold)
    return {"acc": np.mean(acc), "acc_norm": np.mean(acc_norm)}


def expected_perplexity(model, tokenizer, config, documents):
    """Each document after an EOS, in eval.perplexity's non-overlapping windows (the last with a full context)."""
    nll = 0.0
    for text in documents:
        stream = np.array([tokenizer.eos_id] + tokenizer.encode(text))
        if len(stream) - 1 <= config.max_seq_len:  # one window: the sum by hand
            with torch.no_grad():
                log_probs = F.log_softmax(model(torch.from_numpy(stream[None, :-1]))[0][0].float(), dim=-1)
            nll -= sum(log_probs[i, stream[i + 1]].item() for i in range(len(stream) - 1))
        else:
            nll += nll_sums(model, stream, windows(len(stream) - 1, config.max_seq_len, config.max_seq_len), config.max_seq_len, batch_size=1)[
                0
            ].item()
    words = sum(len(re.split(r"\s+", text)) for text in documents)
    num_bytes = sum(len(text.encode("utf-8")) for text in documents)
    return {"word_perplexity": math.exp(nll / words), "byte_perplexity": math.exp(nll / num_bytes), "bits_per_byte": nll / num_bytes / math.log(2)}


def expected_generations(model, tokenizer, max_tokens=12):
    """Greedy answers, one prompt at a time, cut at the first newline."""
    answers = []
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        generated = []
        for _ in range(max_tokens):
            with torch.no_grad():
                token = int(model(torch.tensor([ids + generated]))[0][0, -1, : tokenizer.vocab_size].argmax())
            if token == tokenizer.eos_id:
                break
            generated.append(token)
            if "\n" in tokenizer.decode(generated):
                break
        answers.append(tokenizer.decode(generated).split("\n")[0])
    return answers


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    directory = tmp_path_factory.mktemp("harness_tasks")
    return directory, write_tasks(directory)


def test_the_figures_are_the_models_own_log_probabilities(trained, tasks, tmp_path):
    run = trained("dense")
    directory, documents = tasks
    # batch size 4: rows of several lengths share a forward pass, padded
    proc, figures = harness(run, "--tasks", "tiny_mc,tiny_ppl,tiny_gen", "--include_path", directory, "--batch_size", 4, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    model, config, tokenizer = load_model(run)
    for metric, value in expected_multiple_choice(model, tokenizer).items():
        assert figures["tiny_mc"][metric] == pytest.approx(value, abs=1e-9), metric
    for metric, value in expected_perplexity(model, tokenizer, config, documents).items():
        assert figures["tiny_ppl"][metric] == pytest.approx(value, rel=1e-5), metric
    answers = expected_generations(model, tokenizer)
    assert figures["tiny_gen"]["exact_match"] == pytest.approx(np.mean([a.strip() == "speak" for a in answers]))
    # the texts themselves, batched: prompts of several lengths in one forward pass
    requests = [Instance("generate_until", {}, (prompt, {"until": ["\n"], "max_gen_toks": 12}), i) for i, prompt in enumerate(PROMPTS)]
    assert SwitchyardLM(model, config, tokenizer, batch_size=2).generate_until(requests, disable_tqdm=True) == answers
    print({task: {k: v for k, v in f.items() if not k.endswith("stderr")} for task, f in figures.items()}, answers)
    results_file = figures["tiny_mc"]["results"]
    assert results_file.startswith(str(run / "eval")), results_file
    written = json.loads(open(results_file).read())
    assert written["results"]["tiny_ppl"]["word_perplexity,none"] == figures["tiny_ppl"]["word_perplexity"]
    assert written["switchyard"]["tag"] == figures["tiny_mc"]["tag"]


@pytest.mark.parametrize("name", ["switch", "llama_moe"])
def test_a_run_with_experts_is_scored(trained, tasks, tmp_path, name):
    run = trained(name)
    directory, documents = tasks
    # one row per forward pass: a Switch layer's capacity depends on the tokens of the pass, as here by hand
    proc, figures = harness(run, "--tasks", "tiny_mc,tiny_ppl", "--include_path", directory, "--batch_size", 1, "--output", tmp_path / "switch.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    model, config, tokenizer = load_model(run)
    for metric, value in expected_multiple_choice(model, tokenizer).items():
        assert figures["tiny_mc"][metric] == pytest.approx(value, abs=1e-9), metric
    for metric, value in expected_perplexity(model, tokenizer, config, documents).items():
        assert figures["tiny_ppl"][metric] == pytest.approx(value, rel=1e-5), metric
    assert json.loads((tmp_path / "switch.json").read_text())["switchyard"]["run_dir"] == str(run)


def test_lm_evals_hf_model_on_the_export_gives_the_same_figures(trained, tasks, tmp_path):
    run = trained("dense")
    directory, _ = tasks
    export = subprocess.run(
        [sys.executable, "-m", "eval.export_hf", run, "--output", tmp_path / "hf"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert export.returncode == 0, export.stderr[-3000:]
    lm_eval = subprocess.run(
        [
            sys.executable,
            "-m",
            "lm_eval",
            "--model",
            "hf",
            "--model_args",
            f"pretrained={tmp_path / 'hf'},dtype=float32",
            "--tasks",
            "tiny_mc,tiny_ppl",
        ]
        + ["--include_path", str(directory), "--device", "cpu", "--batch_size", "4", "--output_path", str(tmp_path / "lm_eval")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **OFFLINE},
    )
    assert lm_eval.returncode == 0, lm_eval.stderr[-3000:]
    (results_file,) = glob.glob(str(tmp_path / "lm_eval" / "**" / "results_*.json"), recursive=True)
    theirs = json.loads(open(results_file).read())["results"]
    proc, ours = harness(run, "--tasks", "tiny_mc,tiny_ppl", "--include_path", directory, "--output", tmp_path / "ours.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    print({task: (ours[task], theirs[task]) for task in theirs})
    for task, metrics in (("tiny_mc", ("acc", "acc_norm")), ("tiny_ppl", ("word_perplexity", "byte_perplexity", "bits_per_byte"))):
        for metric in metrics:
            assert ours[task][metric] == pytest.approx(theirs[task][f"{metric},none"], rel=1e-5), (task, metric)


def test_bad_input_is_one_line_before_the_model_is_built(trained, tasks, tmp_path):
    run = trained("dense")
    directory, _ = tasks
    cases = [
        ([tmp_path / "no_run", "--tasks", "tiny_mc"], "does not exist"),
        ([run, "--tasks", "tiny_mcq", "--include_path", directory], "unknown lm-eval task 'tiny_mcq' (did you mean 'tiny_mc'?)"),
        ([run, "--tasks", "tiny_mc", "--include_path", directory, "--tag", "global_step999"], "checkpoint global_step999 is not in"),
        ([run, "--include_path", directory], "pass --tasks NAME"),
        ([run, "--tasks", "tiny_mc", "--include_path", directory, "--output", CORPUS], "exists and is not an eval.harness results file"),
    ]
    for args, expected in cases:
        proc, _ = harness(*args)
        errors = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(errors) == 1 and expected in errors[0], (args, proc.stderr[-2000:])
    assert not (run / "eval" / "lm_eval_global_step999_tiny_mc.json").exists()


def test_an_encoder_decoder_run_is_refused(translation_run, tasks):
    from eval.harness import evaluate
    from switchyard.errors import ConfigError

    with pytest.raises(ConfigError, match=r"eval.harness of .* needs a decoder model .*this one is a 'transformer' encoder-decoder model"):
        evaluate(translation_run, "tiny_mc", include_path=tasks[0])
