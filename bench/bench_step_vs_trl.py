"""One RL step of jaxcov against TRL's GRPOTrainer, on the same workload, in the same run.

    python bench/bench_step_vs_trl.py [--steps 6 --dtypes float32,bfloat16 --skip-trl --skip-jaxcov]

The workload (both trainers): SmolLM2-135M-Instruct (the embedded GGUF, dequantized; TRL loads
jaxcov's HF export of the same weights), the times_table prompts of jaxcov's synthetic dataset
in the order jaxcov's trainer draws them, 4 prompts x 4 samples per step, <= 32 new tokens at
T = 1, GRPO advantages, PPO-clip token-mean loss (TRL's default `dapo` aggregation is the same
token mean), a frozen reference model with a k3 KL of weight 0.04, AdamW lr 1e-6 (constant),
grad clip 1.0, one optimizer update per step, fp32 parameters, no activation checkpointing.

- jaxcov: `python -m jaxcov train` on a generated config (compute dtype per --dtypes), per-step
  times from its metrics.jsonl. Split: sample (generate + decode), reward, ref fwd (the
  reference forward, `time/logprobs`: with one update per step the policy's old log-probs come
  from the update's own gradient pass), update (forward + backward + AdamW), entropy fwd (the
  entropy-after forward the trainer always runs, `time/entropy`; TRL has no such pass), other.
- TRL: its own virtual environment (bench/.venv-trl, made on first use: trl, CPU torch,
  transformers, accelerate, datasets; never in requirements.txt), fp32 (bf16=False),
  gradient_checkpointing=False; a TrainerCallback times on_step_begin -> on_step_end, and
  wrappers time generation, reward, the reference forward and the policy forward.

Reported: the median of the steady steps (the first --warmup steps dropped, and jaxcov steps
that built a new program), and TRL / jaxcov. bf16 rows compare jaxcov bf16 against TRL fp32.
The machine's load average is printed: on a shared machine both sides are slowed, not alike.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MODEL = "smollm2-135m-instruct"
TRL_VERSION = "1.16.0"
TRL_PACKAGES = ("accelerate", "datasets", "transformers")
VENV = os.path.join(HERE, ".venv-trl")
PROMPTS, GROUP, NEW_TOKENS, BETA, LR = 4, 4, 32, 0.04, 1e-6
JAXCOV_PHASES = (("sample", "time/sample"), ("reward", "time/reward"),
                 ("ref fwd", "time/logprobs"), ("update", "time/update"),
                 ("entropy fwd", "time/entropy"))


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


def busy_cores(seconds: float = 2.0) -> float:
    """Cores other processes kept busy over the last `seconds` (from /proc/stat; 0 without)."""
    def sample():
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait
    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except OSError:
        return 0.0
    return (os.cpu_count() or 1) * (1.0 - (idle1 - idle0) / max(total1 - total0, 1))


def wait_until_idle(what: str, limit_s: float) -> None:
    """Waits (up to `limit_s`) for the cores to be free, and warns when they are not: torch's
    OpenMP threads slow down far more than XLA's thread pool next to other work (measured: 16
    tokens of TRL-side generation took 72 s with two threads beside a 2-core jaxcov run, 5 s
    with one), so a ratio measured on a busy machine means little."""
    start = time.perf_counter()
    busy = busy_cores()
    while busy > 0.3 and time.perf_counter() - start < limit_s:
        time.sleep(5)
        busy = busy_cores()
    waited = time.perf_counter() - start
    if waited > 5:
        say(f"{what}: waited {waited:.0f} s for idle cores")
    if busy > 0.3:
        say(f"warning: {what} starts on a busy machine ({busy:.1f} cores in use by others, "
            f"{load_line()})")


def say(text: str) -> None:
    print(text, flush=True)


# ------------------------------------------------------------------------------- the workload


def jaxcov_config(steps: int, dtype: str, run_dir: str) -> dict:
    """The jaxcov experiment of the workload."""
    return {
        "model": {"name": MODEL, "compute_dtype": dtype, "param_dtype": "float32",
                  "remat": "none"},
        "data": {"source": "times_table",
                 "synthetic": {"size": 144, "min_factor": 1, "max_factor": 12}},
        "reward": {"task": "times_table"},
        "sampler": {"max_new_tokens": NEW_TOKENS, "temperature": 1.0},
        "algo": {"advantage": "grpo", "group_size": GROUP, "filter_groups": False,
                 "policy_loss": "ppo_clip", "loss_agg_mode": "token-mean",
                 "ref_kl_coef": BETA, "ref_kl_type": "k3"},
        "optim": {"lr": LR, "schedule": "constant", "grad_clip": 1.0},
        "train": {"steps": steps, "prompts_per_step": PROMPTS, "mini_batch_prompts": PROMPTS,
                  "ppo_epochs": 1, "max_resample_rounds": 0, "run_dir": run_dir,
                  "checkpoint_every": 0, "eval_every": 0, "progress": False,
                  "tensorboard": False, "entropy_instrument": False, "export_hf": False},
    }


def write_yaml(values: dict, path: str) -> str:
    import yaml

    with open(path, "w") as f:
        yaml.safe_dump(values, f, sort_keys=False)
    return path


def export_prompts(config_path: str, steps: int, path: str) -> int:
    """The prompts jaxcov's trainer draws in its first `steps` steps, in order, as TRL rows
    (chat messages with jaxcov's suffix, the ground truth, and jaxcov's prompt token ids)."""
    from jaxcov.config import load_config
    from jaxcov.data import PromptIterator, load_datasets
    from jaxcov.models.registry import load_tokenizer

    config = load_config(config_path)
    train_set, _ = load_datasets(config.data, load_tokenizer(config.model.name))
    batches = PromptIterator(train_set, config.train.prompts_per_step, config.data.seed,
                             config.data.shuffle)
    rows = [{"prompt": e["messages"], "ground_truth": e["ground_truth"],
             "prompt_ids": e["prompt_ids"]}
            for _ in range(steps) for e in batches.next_batch()]
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return len(rows)


def run_logged(cmd: list, log_path: str, timeout: int, env=None) -> float:
    """Runs `cmd` with its output in `log_path`; its wall time. On failure, the log's tail."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                              timeout=timeout, env=env)
    if proc.returncode:
        with open(log_path) as f:
            tail = f.read()[-4000:]
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}); "
                         f"the end of {log_path}:\n{tail}")
    return time.perf_counter() - start


def steady(records: list, warmup: int) -> list:
    return [r for r in records[warmup:] if not r.get("compiled")]


# ---------------------------------------------------------------------------------- jaxcov


def run_jaxcov(args, work: str, dtype: str) -> dict:
    run_dir = os.path.join(work, f"jaxcov-{dtype}")
    cfg = write_yaml(jaxcov_config(args.steps, dtype, run_dir),
                     os.path.join(work, f"jaxcov-{dtype}.yaml"))
    subprocess.run([sys.executable, "-m", "jaxcov", "config", cfg], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL)
    wait_until_idle(f"jaxcov {dtype}", args.wait_idle)
    say(f"jaxcov {dtype}: {args.steps} steps ({load_line()}) ...")
    wall = run_logged([sys.executable, "-m", "jaxcov", "train", cfg],
                      os.path.join(work, f"jaxcov-{dtype}.log"), args.timeout)
    from jaxcov.metrics import read_metrics

    records, previous = [], None
    for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")):
        if "time/step" not in r:
            continue
        compiles = tuple(r.get(f"{p}/compiles", 0) for p in ("sampler", "score", "update",
                                                            "entropy"))
        phases = {name: r.get(key) or 0.0 for name, key in JAXCOV_PHASES}
        phases["other"] = r["time/step"] - sum(phases.values())
        records.append({"step_s": r["time/step"], "phases": phases,
                        "compiled": previous is not None and compiles != previous,
                        "response_len": r.get("response/length_mean"),
                        "reward": r.get("reward/step_batch_mean")})
        previous = compiles
    return {"records": records, "wall_s": wall}


# ------------------------------------------------------------------------------------- TRL


def ensure_export(cache: str) -> str:
    """jaxcov's HF export of the embedded model (once per GGUF file), for transformers."""
    from jaxcov.models.registry import embedded_model_path

    gguf = embedded_model_path(MODEL)
    stat = os.stat(gguf)
    out = os.path.join(cache, f"{MODEL}-hf-{stat.st_size}-{stat.st_mtime_ns}")
    if not os.path.isfile(os.path.join(out, "config.json")):
        tmp = f"{out}.tmp{os.getpid()}"
        say(f"exporting {MODEL} to {out} ...")
        subprocess.run([sys.executable, "-m", "jaxcov", "export", MODEL, tmp], check=True,
                       cwd=REPO, stdout=subprocess.DEVNULL)
        os.replace(tmp, out)
    return out


def torch_requirement() -> str:
    """The CPU torch build already installed here, when there is one (its wheel is then on
    this machine's disk); else torch from the PyTorch CPU index."""
    try:
        from importlib.metadata import version

        installed = version("torch")
    except Exception:
        return "torch"
    return f"torch=={installed}" if "+cpu" in installed else "torch"


def ensure_venv(args) -> str:
    """bench/.venv-trl with trl==TRL_VERSION; made (or updated) on first use."""
    python = os.path.join(VENV, "bin", "python")
    marker = os.path.join(VENV, "jaxcov-bench.json")
    wanted = {"trl": args.trl_version, "torch": args.torch_spec}
    if os.path.isfile(marker) and os.path.isfile(python):
        with open(marker) as f:
            if json.load(f) == wanted:
                return python
    say(f"making {VENV} (trl=={args.trl_version}, {args.torch_spec}) ...")
    start = time.perf_counter()
    if not os.path.isfile(python):
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    cmd = [python, "-m", "pip", "install", "-q", f"trl=={args.trl_version}", args.torch_spec,
           *TRL_PACKAGES]
    if args.torch_spec == "torch":  # the default PyPI torch wheel on Linux is the CUDA build
        cmd += ["--extra-index-url", "https://download.pytorch.org/whl/cpu"]
    subprocess.run(cmd, check=True)
    with open(marker, "w") as f:
        json.dump(wanted, f)
    say(f"  installed in {time.perf_counter() - start:.0f} s")
    return python


def run_trl(args, work: str, cache: str, prompts_path: str) -> dict:
    python = ensure_venv(args)
    model_dir = ensure_export(cache)
    out = os.path.join(work, "trl.json")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "WANDB_DISABLED": "true", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_CACHE": os.path.join(work, "hf-datasets")}
    env.pop("PYTHONPATH", None)
    wait_until_idle("TRL", args.wait_idle)
    say(f"TRL fp32: {args.steps} steps ({load_line()}) ...")
    wall = run_logged([python, os.path.abspath(__file__), "--trl-worker", "--model-dir",
                       model_dir, "--prompts", prompts_path, "--steps", str(args.steps),
                       "--out", out, "--work-dir", work,
                       "--trl-threads", str(args.trl_threads)],
                      os.path.join(work, "trl.log"), args.timeout, env=env)
    with open(out) as f:
        result = json.load(f)
    result["wall_s"] = wall
    return result


def trl_worker(args) -> None:
    """Runs inside the TRL environment: GRPOTrainer on the workload, per-step times to --out."""
    import importlib.util
    import types

    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    if args.trl_threads:
        torch.set_num_threads(args.trl_threads)

    # jaxcov's answer extraction and integer check, loaded from the repo's files (the TRL
    # environment has no jaxcov; these two modules need only the standard library).
    for name in ("jaxcov", "jaxcov.rewards"):
        module = types.ModuleType(name)
        module.__path__ = []
        sys.modules[name] = module
    loaded = {}
    for name in ("extract", "math_answers"):
        spec = importlib.util.spec_from_file_location(
            f"jaxcov.rewards.{name}", os.path.join(REPO, "jaxcov", "rewards", f"{name}.py"))
        loaded[name] = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = loaded[name]
        spec.loader.exec_module(loaded[name])
    extract, answers = loaded["extract"], loaded["math_answers"]

    def correct(response: str, truth: str) -> float:
        """jaxcov's times_table correctness (reward.task times_table, its default extractors;
        non-integer answers, which jaxcov hands to math-verify, count as wrong here)."""
        found = extract.extract_answer(response)
        if found is None:
            return 0.0
        answer = answers.clean_answer(found.answer)
        gold = answers.clean_answer(extract.ground_truth_answer(truth))
        if answers.precheck(answer, 300, 10) is not None:
            return 0.0
        return 1.0 if answers.integer_verdict(gold, answer) else 0.0

    phases: dict = {}

    def timed(name, fn, split=None):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                key = split() if split else name
                phases[key] = phases.get(key, 0.0) + time.perf_counter() - start
        return wrapper

    def times_table_reward(completions, ground_truth, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [correct(t, g) for t, g in zip(texts, ground_truth)]

    rows = [json.loads(line) for line in open(args.prompts)]
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    mismatched = sum(tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True,
                                                   tokenize=True, return_dict=True)["input_ids"]
                     != r["prompt_ids"] for r in rows)
    dataset = Dataset.from_list([{"prompt": r["prompt"], "ground_truth": r["ground_truth"]}
                                 for r in rows])
    config = trl.GRPOConfig(
        output_dir=os.path.join(args.work_dir, "trl-out"), max_steps=args.steps,
        per_device_train_batch_size=PROMPTS * GROUP, gradient_accumulation_steps=1,
        num_generations=GROUP, max_completion_length=NEW_TOKENS, temperature=1.0, top_p=1.0,
        top_k=0, beta=BETA, num_iterations=1, learning_rate=LR, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, loss_type="dapo", epsilon=0.2,
        gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True,
        model_init_kwargs={"dtype": "float32"}, shuffle_dataset=False, logging_steps=1,
        save_strategy="no", report_to="none", log_completions=False, seed=0,
        dataloader_num_workers=0, disable_tqdm=True)
    steps = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            phases.clear()
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            steps.append({"step_s": time.perf_counter() - self.start, "phases": dict(phases)})

    trainer = trl.GRPOTrainer(model=args.model_dir, reward_funcs=[times_table_reward],
                              args=config, train_dataset=dataset, processing_class=tokenizer,
                              callbacks=[StepTimer()])
    trainer._generate = timed("sample", trainer._generate)
    trainer._calculate_rewards = timed("reward", trainer._calculate_rewards)
    trainer._get_per_token_logps_and_entropies = timed(
        "", trainer._get_per_token_logps_and_entropies,
        split=lambda: "policy fwd" if torch.is_grad_enabled() else "ref fwd")
    trainer.train()
    for record in steps:
        record["phases"]["bwd+opt+other"] = record["step_s"] - sum(record["phases"].values())
    with open(args.out, "w") as f:
        json.dump({"records": steps, "trl": trl.__version__, "torch": torch.__version__,
                   "transformers": __import__("transformers").__version__,
                   "threads": torch.get_num_threads(), "prompt_mismatches": mismatched,
                   "log": [h for h in trainer.state.log_history if "loss" in h]}, f)


# ---------------------------------------------------------------------------------- report


def summarize(records: list, warmup: int) -> dict:
    kept = steady(records, warmup)
    if not kept:
        return {"median": float("nan"), "n": 0, "phases": {}}
    phases = {name: statistics.median(r["phases"].get(name, 0.0) for r in kept)
              for name in kept[0]["phases"]}
    return {"median": statistics.median(r["step_s"] for r in kept), "n": len(kept),
            "phases": phases, "steps": [round(r["step_s"], 2) for r in records]}


def report(results: dict, args) -> None:
    say("")
    say(f"Step time, median of steady steps ({args.steps} steps, first {args.warmup} dropped; "
        f"jaxcov steps that built a program also dropped)")
    trl_result = results.get("trl")
    trl_median = summarize(trl_result["records"], args.warmup)["median"] if trl_result else None
    header = f"| {'trainer':<22} | {'median step s':>13} | {'TRL / this':>10} | {'steady':>6} |"
    say(header)
    say("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    rows = []
    if trl_result:
        rows.append((f"TRL {trl_result['trl']} fp32", trl_result))
    for dtype in args.dtypes:
        if f"jaxcov-{dtype}" in results:
            rows.append((f"jaxcov {dtype}", results[f"jaxcov-{dtype}"]))
    for label, result in rows:
        s = summarize(result["records"], args.warmup)
        ratio = f"{trl_median / s['median']:.2f}x" if trl_median else "-"
        say(f"| {label:<22} | {s['median']:>13.2f} | {ratio:>10} | {s['n']:>6} |")
    for label, result in rows:
        s = summarize(result["records"], args.warmup)
        split = ", ".join(f"{name} {value:.2f}" for name, value in s["phases"].items())
        say(f"{label} split (median s): {split}")
        say(f"{label} all steps (s): {s['steps']}")
    for dtype in args.dtypes:
        result = results.get(f"jaxcov-{dtype}")
        if result:
            lengths = [r["response_len"] for r in result["records"]]
            compiled = [i + 1 for i, r in enumerate(result["records"]) if r["compiled"]]
            say(f"jaxcov {dtype}: mean response length per step {lengths}; steps that built "
                f"a program after step 1: {compiled or 'none'}; run wall {result['wall_s']:.0f} s")
    if trl_result:
        say(f"TRL: trl {trl_result['trl']}, torch {trl_result['torch']} "
            f"({trl_result['threads']} threads), transformers {trl_result['transformers']}; "
            f"prompts tokenized unlike jaxcov: {trl_result['prompt_mismatches']}; "
            f"run wall {trl_result['wall_s']:.0f} s")
        lengths = [round(h.get("completions/mean_length", float("nan")), 1)
                   for h in trl_result["log"]]
        say(f"TRL: mean completion length per step {lengths}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2, help="first steps dropped (compile)")
    p.add_argument("--dtypes", default="float32,bfloat16",
                   help="jaxcov compute dtypes, comma-separated")
    p.add_argument("--skip-trl", action="store_true")
    p.add_argument("--skip-jaxcov", action="store_true")
    p.add_argument("--trl-version", default=TRL_VERSION)
    p.add_argument("--torch-spec", default=None,
                   help="torch requirement of the TRL environment (default: the CPU build "
                   "installed here, else torch from the PyTorch CPU index)")
    p.add_argument("--trl-threads", type=int, default=0,
                   help="torch threads of the TRL side (0: torch's default, one per core)")
    p.add_argument("--wait-idle", type=float, default=0.0,
                   help="seconds to wait before each trainer run for other jobs to leave the cores")
    p.add_argument("--work-dir", default="", help="run directories and logs (default: a temp dir)")
    p.add_argument("--timeout", type=int, default=1200, help="seconds per trainer run")
    # The TRL side, run by the script itself inside the TRL environment.
    p.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--prompts", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.trl_worker:
        return trl_worker(args)

    sys.path.insert(0, REPO)
    from machine import machine_line
    from jaxcov.models.registry import cache_dir

    args.dtypes = [d for d in args.dtypes.split(",") if d]
    args.torch_spec = args.torch_spec or torch_requirement()
    cache = os.path.join(cache_dir(), "bench")
    os.makedirs(cache, exist_ok=True)
    work = args.work_dir or tempfile.mkdtemp(prefix="bench_step_vs_trl-")
    os.makedirs(work, exist_ok=True)
    say(machine_line())
    say(f"{time.strftime('%Y-%m-%d %H:%M')}, {load_line()}; work dir {work}")
    say(f"workload: {MODEL}, {PROMPTS} prompts x {GROUP} samples, <= {NEW_TOKENS} new tokens, "
        f"T=1, 1 update/step, ref KL beta {BETA} (k3), lr {LR}, fp32 params, no remat")
    results = {}
    if not args.skip_trl:  # first: other jobs arriving mid-run slow torch most (see above)
        # The prompts jaxcov's trainer draws (the same for every dtype: data seeds only).
        config = write_yaml(jaxcov_config(args.steps, "float32", os.path.join(work, "unused")),
                            os.path.join(work, "prompts.yaml"))
        prompts = os.path.join(work, "prompts.jsonl")
        export_prompts(config, args.steps, prompts)
        results["trl"] = run_trl(args, work, cache, prompts)
    if not args.skip_jaxcov:
        for dtype in args.dtypes:
            results[f"jaxcov-{dtype}"] = run_jaxcov(args, work, dtype)
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    report(results, args)
    say(f"{load_line()} at the end")


if __name__ == "__main__":
    main()
