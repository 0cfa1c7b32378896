"""Score a decoder LM checkpoint with EleutherAI's lm-evaluation-harness (lm-eval) tasks.

    python -m eval.harness RUN_DIR --tasks hellaswag,arc_easy,lambada_openai [--num_fewshot 0] [--batch_size 16]
    python -m eval.harness RUN_DIR --tasks my_task --include_path DIR_OF_TASK_YAMLS [--limit 100] [--output FILE]

RUN_DIR is a pretrain/main.py --save_dir of a decoder family (GPT, Switch LM, Llama, Llama-MoE; any ZeRO stage or
pipeline run, read back by pretrain/run_dir.py's load_model); --tag picks a checkpoint other than ``latest``.
The model reaches lm-eval as the ``switchyard`` model class (SwitchyardLM), registered with lm-eval, which
tokenizes with the run's tokenizer and answers the harness's three requests:

    loglikelihood           log P(continuation | context), and whether greedy decoding gives the continuation.
                            A context with its continuation longer than the model's max_seq_len + 1 tokens is
                            scored in windows, each continuation token from the max_seq_len tokens before it.
    loglikelihood_rolling   a document's log-probability from an EOS (the start a document has in training), in
                            lm-eval's disjoint windows of max_seq_len tokens, the last one with a full context.
    generate_until          greedy decoding until a stop string, EOS or max_gen_toks tokens; past max_seq_len the
                            model reads the last max_seq_len tokens.

Requests are sorted by length and batched (--batch_size rows per forward pass), padded on the right, which a
causal model never reads. A Switch layer's forward has no padding mask, so padding would take expert capacity:
an expert family's batches only hold rows of one length.

Prints one JSON object per task (its metrics) and writes lm-eval's results to --output (default:
RUN_DIR/eval/lm_eval_TAG_TASKS.json). Task data come through datasets: a hub task (hellaswag, ...) needs the
network on first use; local task YAMLs (--include_path) over local files do not.
Bad input (no run, an encoder-decoder run, unknown tag or task): one line on stderr, exit code 2.
"""

import hashlib
import json
import os

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_eval_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from eval.cli import fail, fire_command, write_atomically
from models.registry import check_architecture, family_of
from pretrain.run_dir import UnsafeCheckpoint, load_model, recorded_model_config, require_run_config, resolve_tag
from switchyard.errors import ConfigError

MODEL_NAME = "switchyard"
DEFAULT_MAX_GEN_TOKS = 256
RESULTS_MARK = "switchyard"  # the key that says a results file is this command's, which a re-run may replace


def scoring_windows(sequence, scored, max_len):
    """[(inputs, targets)]: the last ``scored`` tokens of ``sequence`` as targets, each predicted once from the up to
    ``max_len`` tokens before it; a window's inputs are at most max_len tokens, its targets follow its last positions."""
    if not 1 <= scored < len(sequence):
        raise ValueError(f"score 1..{len(sequence) - 1} of {len(sequence)} tokens, not {scored}")
    windows, end = [], len(sequence) - scored  # tokens before ``end`` are scored already (or are context)
    while end < len(sequence):
        new_end = min(end + max_len, len(sequence))
        windows.append((sequence[max(0, new_end - 1 - max_len) : new_end - 1], sequence[end:new_end]))
        end = new_end
    return windows


@register_model(MODEL_NAME)
class SwitchyardLM(TemplateLM):
    """A Switchyard decoder checkpoint as an lm-eval model: ``model`` is a loaded decoder (forward(tokens) ->
    (logits, ...)), ``tokenizer`` the run's. Built from a run with ``from_run`` (or lm-eval's
    --model switchyard --model_args run_dir=DIR,tag=T once this module is imported)."""

    def __init__(
        self, model=None, config=None, tokenizer=None, batch_size=8, device="cpu", run_dir=None, tag=None, max_gen_toks=DEFAULT_MAX_GEN_TOKS
    ):
        super().__init__()
        if run_dir is not None:
            model, config, tokenizer = load_model(str(run_dir), tag, "decoder", "eval.harness")
        self._device = torch.device(device)
        self.model = model.to(self._device).eval()
        self.config, self.tokenizer = config, tokenizer
        self.batch_size = int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.experts = family_of(config).experts

    @property
    def eot_token_id(self):
        return self.tokenizer.eos_id

    @property
    def max_length(self):
        return self.config.max_seq_len

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        return self.tokenizer.encode(string)  # the run's tokenizer adds no special tokens; documents start after an EOS

    def tok_decode(self, tokens):
        return self.tokenizer.decode(tokens)

    def batches(self, rows):
        """Indices of ``rows`` (token lists) in batches, longest first; an expert family's rows of one length each."""
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        batch = []
        for i in order:
            if batch and (len(batch) == self.batch_size or (self.experts and len(rows[i]) != len(rows[batch[0]]))):
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch

    def forward_log_probs(self, rows):
        """Token lists -> float32 log-probabilities (batch, longest, vocab), the rows padded on the right."""
        width = max(len(r) for r in rows)
        tokens = torch.full((len(rows), width), self.eot_token_id, dtype=torch.long)
        for b, r in enumerate(rows):
            tokens[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        return F.log_softmax(self.model(tokens.to(self._device))[0].float(), dim=-1)

    def most_likely(self, log_probs):
        """The argmax among the tokenizer's ids: those from its vocabulary size on (a model's may be larger) are
        never text, nor what greedy decoding can give."""
        return log_probs[..., : self.tokenizer.vocab_size].argmax(dim=-1)

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        """[(string pair or None, context ids, continuation ids)] -> [(log-probability, greedy)] in order."""
        units, owner = [], []  # every request's windows, and the request each window belongs to
        for r, (_, context, continuation) in enumerate(requests):
            for window in scoring_windows(context + continuation, len(continuation), self.max_length):
                units.append(window)
                owner.append(r)
        totals = [[0.0, True] for _ in requests]
        rows = [inputs for inputs, _ in units]
        for batch in tqdm(list(self.batches(rows)), desc="loglikelihood", disable=disable_tqdm):
            log_probs = self.forward_log_probs([rows[u] for u in batch])
            for b, u in enumerate(batch):
                inputs, targets = units[u]
                target = torch.tensor(targets, device=log_probs.device)
                picked = log_probs[b, len(inputs) - len(targets) : len(inputs)]
                totals[owner[u]][0] += picked.gather(1, target[:, None]).sum().item()
                totals[owner[u]][1] &= bool((self.most_likely(picked) == target).all())
        answers = [(total, greedy) for total, greedy in totals]
        for (pair, _, _), answer in zip(requests, answers):
            if pair is not None:
                self.cache_hook.add_partial("loglikelihood", pair, answer)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        """Each document's log-probability after an EOS, in lm-eval's disjoint windows of max_seq_len tokens."""
        pairs, owner = [], []
        for r, (string,) in enumerate(req.args for req in requests):
            windows = lm_eval_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1
            )
            for context, continuation in map(lm_eval_utils.make_disjoint_window, windows):
                pairs.append((None, context, continuation))
                owner.append(r)
        totals = [0.0] * len(requests)
        for r, (log_prob, _) in zip(owner, self._loglikelihood_tokens(pairs, disable_tqdm=disable_tqdm)):
            totals[r] += log_prob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm=False):
        """Greedy continuations, each cut before its first stop string (``until``, and the EOS token)."""
        contexts, settings = [], []
        for context, gen_kwargs in (req.args for req in requests):
            gen_kwargs = dict(gen_kwargs)
            if gen_kwargs.pop("do_sample", False) or gen_kwargs.get("temperature", 0.0) > 0:
                raise ConfigError(f"eval.harness decodes greedily; the task asks for sampling ({gen_kwargs}); give it do_sample: false")
            until = list(gen_kwargs.get("until") or [])
            contexts.append(self.tok_encode(context) or [self.prefix_token_id])
            settings.append((until, int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))))
        outputs = [None] * len(requests)
        for batch in tqdm(list(self.batches(contexts)), desc="generate_until", disable=disable_tqdm):
            texts = self.greedy([contexts[i] for i in batch], [settings[i] for i in batch])
            for i, text in zip(batch, texts):
                outputs[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return outputs

    def greedy(self, contexts, settings):
        """Rows decoded in step; a row stops at EOS, a stop string or its token budget, the batch when all have."""
        generated = [[] for _ in contexts]
        done = [max_toks <= 0 for _, max_toks in settings]
        texts = ["" for _ in contexts]
        while not all(done):
            rows = [(context + tokens)[-self.max_length :] for context, tokens in zip(contexts, generated)]
            log_probs = self.forward_log_probs(rows)
            last = torch.tensor([len(r) - 1 for r in rows], device=log_probs.device)
            chosen = self.most_likely(log_probs[torch.arange(len(rows), device=log_probs.device), last]).tolist()
            for b, token in enumerate(chosen):
                if done[b]:
                    continue
                until, max_toks = settings[b]
                if token == self.eot_token_id:
                    done[b] = True
                    continue
                generated[b].append(token)
                texts[b] = self.tok_decode(generated[b])
                stops = [texts[b].index(stop) for stop in until if stop and stop in texts[b]]
                if stops:
                    texts[b] = texts[b][: min(stops)]
                    done[b] = True
                elif len(generated[b]) >= max_toks:
                    done[b] = True
        return texts


def task_names(tasks):
    """--tasks as a list: fire passes "a,b" as a tuple, "a" as a string."""
    names = tasks.split(",") if isinstance(tasks, str) else [str(t) for t in (tasks or ())]
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ConfigError("pass --tasks NAME[,NAME...] (e.g. --tasks hellaswag,arc_easy; list them with: lm-eval ls tasks)")
    return names


def task_manager(names, include_path):
    """lm-eval's TaskManager that knows every name, or a ConfigError naming the unknown ones. With --include_path it
    first indexes only that folder: indexing lm-eval's thousands of built-in YAMLs takes seconds."""
    import difflib

    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not os.path.isdir(include_path):
            raise ConfigError(f"--include_path {include_path} is not a directory; pass the folder of your task YAMLs")
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(name in local.all_tasks for name in names):
            return local
    manager = TaskManager(include_path=include_path)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        hints = [
            f"{name!r}" + (f" (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(name, manager.all_tasks, n=1)) else "") for name in unknown
        ]
        raise ConfigError(
            f"unknown lm-eval task {', '.join(hints)}; list the tasks with: lm-eval ls tasks"
            + ("" if include_path else " (local task YAMLs: pass their folder to --include_path)")
        )
    return manager


def default_output(run_dir, tag, names):
    """RUN_DIR/eval/lm_eval_TAG_TASKS.json: a re-run of the same tasks replaces its own results only."""
    joined = "+".join(names)
    if len(joined) > 100:  # a file name has a length limit; a long task list gets a digest of itself
        joined = hashlib.sha256(joined.encode()).hexdigest()[:16]
    return os.path.join(run_dir, "eval", f"lm_eval_{tag}_{joined}.json")


def check_output(output):
    """An existing --output is replaced only if it is a results file of this command."""
    if not os.path.exists(output):
        parent = os.path.dirname(os.path.abspath(output))
        if os.path.exists(parent) and not os.path.isdir(parent):
            raise ConfigError(f"--output {output}: {parent} is a file; pass a path in a directory")
        return
    try:
        with open(output, encoding="utf-8") as f:
            ours = RESULTS_MARK in json.load(f)
    except (OSError, ValueError, TypeError):
        ours = False
    if not ours:
        raise ConfigError(f"--output {output} exists and is not an eval.harness results file; pass a new path")


def task_metrics(results):
    """{task: {metric: value}} of lm-eval's results, the default filter's ",none" dropped from the metric names."""
    return {
        task: {key.removesuffix(",none"): value for key, value in metrics.items() if key != "alias"} for task, metrics in results["results"].items()
    }


def evaluate(
    run_dir,
    tasks,
    tag=None,
    batch_size=8,
    limit=None,
    num_fewshot=None,
    output=None,
    include_path=None,
    device=None,
    max_gen_toks=DEFAULT_MAX_GEN_TOKS,
):
    """(lm-eval's results dict, the path written): the checks first, then the model, then the tasks."""
    import lm_eval

    run_dir = str(run_dir)
    config = recorded_model_config(require_run_config(run_dir), run_dir)
    check_architecture(config, "decoder", f"eval.harness of {run_dir}")  # an encoder-decoder run has no lm-eval form
    tag = resolve_tag(run_dir, tag)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"--batch_size must be an integer >= 1, got {batch_size!r}")
    if num_fewshot is not None and (not isinstance(num_fewshot, int) or num_fewshot < 0):
        raise ConfigError(f"--num_fewshot must be an integer >= 0, got {num_fewshot!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0):
        raise ConfigError(f"--limit must be a number of examples per task (or a fraction below 1), got {limit!r}")
    names = task_names(tasks)
    include_path = None if include_path is None else str(include_path)
    manager = task_manager(names, include_path)
    output = str(output) if output is not None else default_output(run_dir, tag, names)
    check_output(output)
    if device is None:
        from pretrain.distributed import local_device

        device = local_device()
    model = SwitchyardLM(run_dir=run_dir, tag=tag, batch_size=batch_size, device=device, max_gen_toks=max_gen_toks)
    results = lm_eval.simple_evaluate(model=model, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=manager, log_samples=False)
    results[RESULTS_MARK] = {"run_dir": run_dir, "tag": tag, "tasks": names}
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    write_atomically(output, json.dumps(results, indent=1, default=lm_eval_utils.handle_non_serializable) + "\n")
    return results, output


def main(
    run_dir,
    tasks=None,
    tag=None,
    batch_size=8,
    limit=None,
    num_fewshot=None,
    output=None,
    include_path=None,
    device=None,
    max_gen_toks=DEFAULT_MAX_GEN_TOKS,
):
    """Score checkpoint TAG of RUN_DIR on lm-eval TASKS; prints one JSON object per task.

    Args:
        run_dir: a pretrain/main.py --save_dir of a decoder LM.
        tasks: lm-eval task names, comma-separated (hellaswag,arc_easy,lambada_openai; lm-eval ls tasks lists them).
        tag: the checkpoint (global_stepN; default: the one ``latest`` names).
        batch_size: rows per forward pass.
        limit: examples per task (a fraction below 1: that share of each task), for a quick look.
        num_fewshot: examples in each prompt (default: the task's own).
        output: lm-eval's results JSON (default: RUN_DIR/eval/lm_eval_TAG_TASKS.json).
        include_path: a folder of local task YAMLs.
        device: cpu, cuda, cuda:1 (default: this process's GPU, else the CPU).
        max_gen_toks: most tokens a generation task's answer gets when the task does not say.
    """
    try:
        results, path = evaluate(run_dir, tasks, tag, batch_size, limit, num_fewshot, output, include_path, device, max_gen_toks)
    except (ConfigError, UnsafeCheckpoint) as e:
        fail(str(e))
    mark = results[RESULTS_MARK]
    for task, metrics in task_metrics(results).items():
        print(json.dumps({"task": task, **metrics, "run_dir": mark["run_dir"], "tag": mark["tag"], "results": path}, default=str), flush=True)


if __name__ == "__main__":
    fire_command(main, "eval.harness")
