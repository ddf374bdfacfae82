"""Experiment configuration: frozen dataclasses are the schema, YAML files hold the values.

`load_config(path, overrides)` reads a YAML file (after the file its top-level `base:` names, if
any), applies dotted `section.key=value` overrides and builds an `ExperimentConfig`. Every problem (unknown key, wrong type, bad value, missing file) is a
`ConfigError` whose message is one line naming the key and where it came from; the CLI prints it
and exits with status 2.

Each section validates its own values in `__post_init__` by raising `ConfigError` with the field
name; the loader adds the section and the file to the message.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A configuration problem, described in one line."""


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which model to load and how to run it.

    Attributes:
      name: a registered name (`smollm2-135m-instruct`), an HF directory, a `.gguf` file, or
        `random:<family>` (a tiny random model: llama, llama-tied, mistral, qwen2, qwen3).
      tokenizer: where the tokenizer comes from when not from `name`: a directory with
        tokenizer files, a `.gguf` file or a registered name (needed for random:, and for a
        model directory without tokenizer files, e.g. a plain `save_pretrained` of a model).
      param_dtype: dtype the parameters are stored and updated in.
      compute_dtype: dtype of matmuls and activations (softmax, norms and log-probs stay fp32).
      remat: rematerialisation policy of each layer: none | full | dots | dots_no_batch.
      attention: the attention implementation (`jaxcov.models.attention`): auto (splash on
        TPU, cuDNN on GPU in bf16, chunked otherwise) | dense | chunked | splash | cudnn.
      attention_block: query/key block of chunked attention (and the length up to which the
        CPU path keeps the whole softmax).
      logits_chunk: sequence chunk for log-prob/entropy so full B x T x V logits never exist at once.
    """

    name: str = "smollm2-135m-instruct"
    tokenizer: str = ""
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "full"
    attention: Literal["auto", "dense", "chunked", "splash", "cudnn"] = "auto"
    attention_block: int = 512
    logits_chunk: int = 128

    def __post_init__(self):
        if self.name.startswith("random:"):
            from jaxcov.models.presets import TINY_CONFIGS  # imports jax: only for random:

            family = self.name[len("random:"):]
            _require(family in TINY_CONFIGS, "name", f"{self.name}: no such random model "
                     f"(random:<family>, the families: {', '.join(TINY_CONFIGS)})")
        _require(not self.name.startswith("random:") or bool(self.tokenizer), "tokenizer",
                 f"a random model ({self.name}) needs a tokenizer source")
        _require(self.attention_block > 0 and self.attention_block % 8 == 0, "attention_block",
                 f"must be a positive multiple of 8, got {self.attention_block}")
        _require(self.attention != "cudnn" or self.compute_dtype == "bfloat16", "attention",
                 "cudnn needs compute_dtype bfloat16 (cuDNN flash attention takes no fp32)")
        _require(self.logits_chunk > 0, "logits_chunk", f"must be > 0, got {self.logits_chunk}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes along (data, fsdp, tensor); one size may be -1 for "all the rest"."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        for key, size in sizes.items():
            _require(size == -1 or size >= 1, key, f"must be >= 1 or -1, got {size}")
        _require(list(sizes.values()).count(-1) <= 1, "data", "at most one mesh axis may be -1")


@dataclasses.dataclass(frozen=True)
class AlgoConfig:
    """The RL objective: advantage estimator, policy loss and its regularisers.

    Attributes:
      advantage: grpo | drgrpo | rloo | reinforce_pp | reinforce_pp_baseline.
      group_size: samples per prompt n; rows g*n .. g*n+n-1 of a batch form group g.
      filter_groups: drop groups whose samples all got the same reward (DAPO dynamic sampling).
      gamma: discount of the REINFORCE++ token returns.
      policy_loss: ppo_clip | clip_cov | kl_cov.
      eps_low, eps_high: PPO ratio clip range [1 - eps_low, 1 + eps_high] (clip-higher: 0.28).
      dual_clip_c: dual-clip bound c > 1 for negative-advantage tokens; null disables it.
      clip_cov_ratio, clip_cov_lb, clip_cov_ub: Clip-Cov removes from the gradient
        max(1, int(ratio * N)) random tokens with lb < cov < ub that PPO has not clipped.
      kl_cov_ratio, kl_cov_coef: KL-Cov adds coef * |logp - old_logp| to the
        max(1, int(ratio * N)) tokens of largest cov.
      loss_agg_mode: token-mean | seq-mean-token-sum | seq-mean-token-mean |
        seq-mean-token-sum-norm.
      loss_norm_length: the constant length of seq-mean-token-sum-norm (Dr.GRPO); 0 means the
        padded response length of the batch.
      entropy_coef: entropy bonus weight (the loss subtracts coef * entropy).
      ref_kl_coef, ref_kl_type: reference-policy KL term (k1 | k2 | k3 | abs); 0 disables it.
    """

    advantage: Literal["grpo", "drgrpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"] = "grpo"
    group_size: int = 8
    filter_groups: bool = True
    gamma: float = 1.0
    policy_loss: Literal["ppo_clip", "clip_cov", "kl_cov"] = "ppo_clip"
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip_c: Optional[float] = None
    clip_cov_ratio: float = 2e-4
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    kl_cov_ratio: float = 2e-3
    kl_cov_coef: float = 1.0
    loss_agg_mode: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                           "seq-mean-token-sum-norm"] = "token-mean"
    loss_norm_length: int = 0
    entropy_coef: float = 0.0
    ref_kl_coef: float = 0.0
    ref_kl_type: Literal["k1", "k2", "k3", "abs"] = "k3"

    def __post_init__(self):
        # Estimators that compare a sample with its group have no baseline in a group of one.
        grouped = self.advantage in ("grpo", "drgrpo", "rloo", "reinforce_pp_baseline")
        _require(self.group_size >= 1, "group_size", f"must be >= 1, got {self.group_size}")
        _require(not grouped or self.group_size >= 2, "group_size",
                 f"{self.advantage} needs group_size >= 2, got {self.group_size}")
        _require(not self.filter_groups or self.group_size >= 2, "filter_groups",
                 "needs group_size >= 2 (a group of one always has equal rewards)")
        _require(0.0 <= self.gamma <= 1.0, "gamma", f"must be in [0, 1], got {self.gamma}")
        _require(0.0 <= self.eps_low < 1.0, "eps_low", f"must be in [0, 1), got {self.eps_low}")
        _require(self.eps_high >= 0.0, "eps_high", f"must be >= 0, got {self.eps_high}")
        _require(self.dual_clip_c is None or self.dual_clip_c > 1.0, "dual_clip_c",
                 f"must be > 1 or null, got {self.dual_clip_c}")
        for key in ("clip_cov_ratio", "kl_cov_ratio"):
            value = getattr(self, key)
            _require(0.0 < value <= 1.0, key, f"must be in (0, 1], got {value}")
        _require(self.clip_cov_lb < self.clip_cov_ub, "clip_cov_lb",
                 f"must be < clip_cov_ub, got {self.clip_cov_lb} >= {self.clip_cov_ub}")
        for key in ("kl_cov_coef", "loss_norm_length", "entropy_coef", "ref_kl_coef"):
            value = getattr(self, key)
            _require(value >= 0, key, f"must be >= 0, got {value}")


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of the generated datasets (`data.source: times_table | addition | countdown`).

    Attributes:
      size: distinct problems generated (train + held-out); fewer if the task has fewer.
      seed: generator seed (the shuffling seed is `data.seed`).
      min_factor, max_factor: times_table factors a, b in [min_factor, max_factor].
      digits, terms: addition of `terms` numbers of `digits` digits each.
      numbers, max_number, max_target: countdown with `numbers` numbers in [1, max_number] and a
        target in [1, max_target].
    """

    size: int = 1000
    seed: int = 0
    min_factor: int = 2
    max_factor: int = 12
    digits: int = 2
    terms: int = 2
    numbers: int = 3
    max_number: int = 20
    max_target: int = 100

    def __post_init__(self):
        for key in ("size", "min_factor", "digits", "max_number", "max_target"):
            _require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        _require(self.max_factor >= self.min_factor, "max_factor",
                 f"must be >= min_factor ({self.min_factor}), got {self.max_factor}")
        _require(self.terms >= 2, "terms", f"must be >= 2, got {self.terms}")
        _require(self.numbers >= 2, "numbers", f"must be >= 2, got {self.numbers}")


@dataclasses.dataclass(frozen=True)
class ColumnsConfig:
    """Which columns of a dataset file hold what; a dotted name reaches into a nested record.

    Attributes:
      prompt: verl/DAPO layout: the prompt as a list of chat messages ({role, content}).
      ground_truth: verl/DAPO layout: the reference answer.
      question, answer: plain layout.
      solution: plain layout: the ground truth is its last \\boxed{} when `answer` is empty.
      data_source: kept with each example.
      task: optional column naming each row's reward task; empty: `reward.task` for every row.
    """

    prompt: str = "prompt"
    ground_truth: str = "reward_model.ground_truth"
    question: str = "question"
    answer: str = "answer"
    solution: str = "solution"
    data_source: str = "data_source"
    task: str = ""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where prompts come from and how they become token ids.

    Attributes:
      source: a generated dataset (times_table | addition | countdown), a .jsonl or .parquet
        file, or a directory written by HF `datasets` `save_to_disk`.
      split: the split to read from a `DatasetDict` directory.
      layout: auto | verl (chat-message prompt + reward_model.ground_truth) | qa (question and
        answer columns).
      columns: column names of file datasets.
      system_prompt: system message put before every prompt that has none; null keeps the chat
        template's default.
      prompt_suffix: appended to the last user message (an answer-format instruction).
      max_prompt_len: prompts longer than this many tokens (chat template included) are dropped.
      eval_source: a separate held-out dataset; empty: hold out `eval_size` examples of `source`.
      eval_size: examples of `source` held out for evaluation when `eval_source` is empty.
      shuffle: shuffle the order every epoch (seeded by `seed` and the epoch number).
      seed: seed of the shuffling and of the held-out split.
      on_bad_row: error (stop, naming the file and row) | skip (count the row and go on).
      synthetic: knobs of the generated datasets.
    """

    source: str = "times_table"
    split: str = "train"
    layout: Literal["auto", "verl", "qa"] = "auto"
    columns: ColumnsConfig = dataclasses.field(default_factory=ColumnsConfig)
    system_prompt: Optional[str] = None
    prompt_suffix: str = " Put the final answer in \\boxed{}."
    max_prompt_len: int = 256
    eval_source: str = ""
    eval_size: int = 0
    shuffle: bool = True
    seed: int = 0
    on_bad_row: Literal["error", "skip"] = "error"
    synthetic: SyntheticConfig = dataclasses.field(default_factory=SyntheticConfig)

    def __post_init__(self):
        _require(bool(self.source), "source", "must not be empty")
        _require(self.max_prompt_len > 0, "max_prompt_len",
                 f"must be > 0, got {self.max_prompt_len}")
        _require(self.eval_size >= 0, "eval_size", f"must be >= 0, got {self.eval_size}")


@dataclasses.dataclass(frozen=True)
class OverlongConfig:
    """DAPO's soft overlong punishment, measured in response tokens.

    The term is 0 up to max_len - buffer tokens, falls linearly to -1 at max_len, and is -1
    beyond (a truncated response).

    Attributes:
      weight: its weight in the reward; 0 turns it off.
      max_len: L_max, normally the sampler's maximum response length.
      buffer: L_cache, the length of the ramp.
    """

    weight: float = 0.0
    max_len: int = 0
    buffer: int = 0

    def __post_init__(self):
        if self.weight != 0.0:
            _require(self.max_len > 0, "max_len",
                     f"must be > 0 when weight != 0, got {self.max_len}")
            _require(0 < self.buffer <= self.max_len, "buffer",
                     f"must be in [1, max_len={self.max_len}], got {self.buffer}")


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """How responses are scored: verifiers, weighted reward terms, and safety bounds.

    reward = correct_weight * correct + format_weight * format + overlong.weight * overlong
             + custom_weight * custom

    Attributes:
      task: reward task of rows that name none: math | times_table | addition | countdown.
      extractors: how the final answer is found, tried in order: boxed | answer_is | last_number.
      correct_weight: weight of the correctness term (1 if correct, else `incorrect_value`).
      incorrect_value: the correctness term of a wrong or missing answer (DAPO uses -1).
      format_weight: weight of the format term (1 if the answer is in a well-formed \\boxed{}).
      overlong: DAPO's overlong penalty.
      custom_fn: `module:function` called as fn(response: str, row: dict, response_length: int)
        -> float; empty: no custom term.
      custom_weight: weight of the custom term.
      timeout_s: bound on the CPU seconds one answer's verification may use (and 10x that of
        wall-clock time); past it the answer scores as incorrect and counts in reward/timeouts.
      num_workers: verifier processes; 0: one per core, at most 8.
      worker_memory_mb: address-space cap of each verifier process; 0: none.
      max_answer_chars, max_brace_depth: answers beyond these are refused unverified.
    """

    task: str = "math"
    extractors: tuple[Literal["boxed", "answer_is", "last_number"], ...] = (
        "boxed", "answer_is", "last_number")
    correct_weight: float = 1.0
    incorrect_value: float = 0.0
    format_weight: float = 0.0
    overlong: OverlongConfig = dataclasses.field(default_factory=OverlongConfig)
    custom_fn: str = ""
    custom_weight: float = 1.0
    timeout_s: float = 1.0
    num_workers: int = 0
    worker_memory_mb: int = 2048
    max_answer_chars: int = 300
    max_brace_depth: int = 10

    def __post_init__(self):
        _require(len(self.extractors) > 0, "extractors", "must name at least one extractor")
        _require(self.timeout_s > 0, "timeout_s", f"must be > 0, got {self.timeout_s}")
        for key in ("num_workers", "worker_memory_mb"):
            _require(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        for key in ("max_answer_chars", "max_brace_depth"):
            _require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        module, _, function = self.custom_fn.partition(":")
        _require(not self.custom_fn or bool(module and function), "custom_fn",
                 f"expected module:function, got {self.custom_fn!r}")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Rollout generation (`jaxcov.sampler`).

    Attributes:
      max_new_tokens: response length limit; a row also ends at its first stop token.
      temperature: softmax temperature; 0 means greedy.
      top_k: keep only the k most likely tokens; 0 disables.
      top_p: keep the smallest set of most likely tokens whose mass reaches p; 1.0 disables.
      max_prompt_len: longest prompt in tokens; a longer one is an error unless truncate_prompts.
      truncate_prompts: keep the last max_prompt_len tokens of a longer prompt instead of failing.
      stop_token_ids: stop ids in addition to the tokenizer's EOS (and <|im_end|>, <|eot_id|>).
      compute_dtype: dtype of the sampling forward; null means the model's compute dtype.
        bfloat16 is faster; its log-probs then differ slightly from an fp32 policy's.
      min_bucket: smallest prompt-length and response-length bucket; lengths are rounded up to
        min_bucket x (1, 2, 4, 8, ...), capped at max_prompt_len for prompts, so a run compiles
        each program a few times, not once per batch (and the prompt count to a power of two).
      share_prompt_prefix: run the leading tokens all prompts of a batch share (the chat
        template's system prompt, say; cut down to 8 x (1, 1.5, 2, 3, ...)) once, not once per
        prompt.
        Results are the same either way; off for sliding-window models.
      pad_prompts: "dataset": training and eval pad every prompt to the bucket of the longest
        prompt in their datasets, so the sampler, scoring and update programs are built once
        (more padding in batches of short prompts); "batch": to the bucket of the batch's
        longest prompt (less padding, a program for each width the first time it turns up).
      engine: "continuous": decode slots draw (prompt, sample) items from a queue and a slot
        whose response ended takes the next item, so a rollout costs the tokens it generates
        (`jaxcov.continuous`); "static": one row per item, decoded until the longest ends.
        Both give the same greedy tokens.
      slots: the continuous engine's decode slots (its KV memory is slots x (prompt + response
        buckets)); 0: one per row. Fewer slots than rows bound the KV memory: ended items
        make room for waiting ones. Once the queue is empty the loop sheds the ended slots
        (half, then a quarter of them).
    """

    max_new_tokens: int = 512
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_prompt_len: int = 512
    truncate_prompts: bool = False
    stop_token_ids: tuple[int, ...] = ()
    compute_dtype: Optional[Literal["float32", "bfloat16"]] = None
    min_bucket: int = 16
    share_prompt_prefix: bool = True
    pad_prompts: Literal["dataset", "batch"] = "dataset"
    engine: Literal["continuous", "static"] = "continuous"
    slots: int = 0

    def __post_init__(self):
        for key in ("max_new_tokens", "max_prompt_len", "min_bucket"):
            _require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        _require(self.slots >= 0, "slots", f"must be >= 0 (0: automatic), got {self.slots}")
        _require(self.temperature >= 0.0, "temperature", f"must be >= 0, got {self.temperature}")
        _require(self.top_k >= 0, "top_k", f"must be >= 0, got {self.top_k}")
        _require(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """optax AdamW with warmup, then a constant or cosine schedule, and gradient clipping.

    Attributes:
      lr: peak learning rate (also the eta of the covariance-predicted entropy change).
      schedule: constant | cosine (decays to lr * min_lr_ratio at train.steps).
      warmup_steps: linear warmup from 0 over this many optimizer steps.
      grad_clip: global-norm clip; 0 disables it.
    """

    lr: float = 1e-6
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0

    def __post_init__(self):
        _require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        for key in ("warmup_steps", "weight_decay", "grad_clip", "min_lr_ratio"):
            _require(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        for key in ("b1", "b2"):
            _require(0 <= getattr(self, key) < 1, key, f"must be in [0, 1), got {getattr(self, key)}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The RL loop: batch sizes, update schedule, evaluation, checkpoints and logging.

    Attributes:
      steps: RL steps (one rollout batch each).
      prompts_per_step: prompts drawn per step; each is sampled algo.group_size times.
      mini_batch_prompts: prompts per optimizer mini-batch (paper: 256 per step, 32 per mini-batch).
      micro_batch_size: sequences per gradient-accumulation micro-batch; 0: the whole mini-batch.
      ppo_epochs: passes over the rollout batch per step.
      old_logprobs: where the rollout policy's log-probs come from: auto (the step's first
        update takes its rows' old log-probs and entropy from its own gradient pass, exactly;
        a scoring forward runs on the other rows only, or on all with ppo_epochs > 1)
        | recompute (a scoring forward over the whole batch before the updates)
        | sampler (the sampler's T=1 log-probs; off by the sampler's rounding, ~1e-5 in fp32
        and ~3e-2 in bf16, whose sign then gives KL-Cov's |logp - old| a gradient).
      max_resample_rounds: with algo.filter_groups, extra prompt draws allowed to refill a batch.
      run_dir: where checkpoints, metrics, plots and exports go; a rerun resumes from it.
      checkpoint_dir: where checkpoints go instead of run_dir/checkpoints, e.g. a gs:// bucket
        (orbax writes there directly) while metrics stay in a local run_dir.
      checkpoint_every: save every k steps (and at the end, and on SIGTERM/SIGINT); 0: only those.
      keep_checkpoints: how many recent checkpoints to keep.
      eval_every: evaluate on the held-out split every k steps (and before the first and after
        the last step); 0 disables periodic eval.
      eval_examples: held-out prompts evaluated (0: all of them).
      eval_samples: k of avg@k / pass@k; eval_temperature: their sampling temperature.
      eval_batch_prompts: held-out prompts per generate call (0: prompts_per_step).
      eval_greedy: also measure greedy accuracy (one more generate call per batch).
      max_bad_steps: consecutive non-finite losses/gradients before the run stops.
      export_hf: export the final policy as an HF directory run_dir/hf.
      tensorboard: write TensorBoard events; wandb_project: log to W&B when installed.
      progress: show a progress bar.
      entropy_instrument: after each step's updates, compare the logits before and after over
        the whole vocabulary at every response position: the measured entropy change next to
        the lemma's first-order prediction -Cov(log pi, dz) and its midpoint form, and where
        the change sits (`entropy/dH_*`, `jaxcov.entropy`). Off: only the entropy after.
      entropy_rows: rows of the step batch the instrument reads (a fixed random subset per
        step; the default 8 is a quarter of the default run's 32 rows, bench/RESULTS.md); 0: all.
    """

    steps: int = 20
    prompts_per_step: int = 8
    mini_batch_prompts: int = 8
    micro_batch_size: int = 0
    ppo_epochs: int = 1
    old_logprobs: Literal["auto", "sampler", "recompute"] = "auto"
    max_resample_rounds: int = 2
    run_dir: str = "runs/default"
    checkpoint_dir: str = ""
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    eval_every: int = 0
    eval_examples: int = 0
    eval_samples: int = 4
    eval_temperature: float = 1.0
    eval_batch_prompts: int = 0
    eval_greedy: bool = True
    max_bad_steps: int = 3
    export_hf: bool = False
    tensorboard: bool = True
    wandb_project: str = ""
    progress: bool = True
    entropy_instrument: bool = True
    entropy_rows: int = 8

    @property
    def updates_per_step(self) -> int:
        """Optimizer updates of one RL step: ppo_epochs passes over its mini-batches."""
        return self.ppo_epochs * (self.prompts_per_step // self.mini_batch_prompts)

    @property
    def checkpoints(self) -> str:
        """The checkpoint directory this run writes and resumes from."""
        return self.checkpoint_dir or os.path.join(self.run_dir, "checkpoints")

    def __post_init__(self):
        for key in ("steps", "prompts_per_step", "mini_batch_prompts", "ppo_epochs",
                    "keep_checkpoints", "eval_samples", "max_bad_steps"):
            _require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("micro_batch_size", "max_resample_rounds", "checkpoint_every", "eval_every",
                    "eval_examples", "eval_batch_prompts", "entropy_rows"):
            _require(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        _require(self.mini_batch_prompts <= self.prompts_per_step, "mini_batch_prompts",
                 f"({self.mini_batch_prompts}) must be <= prompts_per_step "
                 f"({self.prompts_per_step})")
        _require(self.prompts_per_step % self.mini_batch_prompts == 0, "mini_batch_prompts",
                 f"({self.mini_batch_prompts}) must divide prompts_per_step "
                 f"({self.prompts_per_step})")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """The whole experiment: one field per YAML section."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    algo: AlgoConfig = dataclasses.field(default_factory=AlgoConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    sampler: SamplerConfig = dataclasses.field(default_factory=SamplerConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    seed: int = 0

    # The derived batch sizes: every module takes them from here.
    @property
    def step_rows(self) -> int:
        """Responses of one RL step: prompts_per_step x group_size."""
        return self.train.prompts_per_step * self.algo.group_size

    @property
    def mini_batch_rows(self) -> int:
        """Rows of one optimizer update: mini_batch_prompts x group_size."""
        return self.train.mini_batch_prompts * self.algo.group_size

    @property
    def micro_batch_rows(self) -> int:
        """Rows of one gradient-accumulation pass (train.micro_batch_size; 0: the mini-batch)."""
        return self.train.micro_batch_size or self.mini_batch_rows


# --------------------------------------------------------------------------- building from dicts


_FLOAT_LITERAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks `value` against the annotation `tp`, converting only where it is lossless."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: must not be null")
    if origin is Literal:
        choices = typing.get_args(tp)
        _require(value in choices, key, f"must be one of {list(choices)}, got {value!r}")
        return value
    if origin in (tuple, list):
        _require(isinstance(value, (list, tuple)), key, f"expected a list, got {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        _require(isinstance(value, dict), key, f"expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        _require(isinstance(value, dict), key, f"expected a mapping (section), got {value!r}")
        return build_dataclass(tp, value, prefix=key + ".")
    if tp is Any:
        return value
    if tp is bool:
        _require(isinstance(value, bool), key, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        _require(isinstance(value, int) and not isinstance(value, bool), key,
                 f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_LITERAL.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads `1e-6` (no dot) as a string
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        _require(ok, key, f"expected a number, got {value!r}")
        _require(math.isfinite(value), key, f"must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        _require(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported annotation {_type_name(tp)}")


def build_dataclass(cls: type, values: dict, prefix: str = "") -> Any:
    """Builds dataclass `cls` from a plain dict, checking keys and types recursively."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (valid keys: {', '.join(fields)})")
    kwargs = {name: _coerce(v, hints[name], prefix + name) for name, v in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(prefix + str(e)) from None


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Returns a copy of the nested dict `values` with dotted overrides applied."""
    values = _deep_copy(values)
    for text in overrides:
        path, value = _parse_override(text)
        node = values
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(path)}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return values


def _deep_copy(values: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in values.items()}


def read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            values = yaml.safe_load(f)
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            where = f" (line {line + 1})" if line is not None else ""
            raise ConfigError(f"{path}{where}: not valid YAML") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return values


def _merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`, section by section (a non-mapping value replaces outright)."""
    merged = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both else value
    return merged


def read_config_values(path: str, _seen: tuple[str, ...] = ()) -> dict:
    """The YAML values of `path`. A top-level `base: FILE` (relative to this file) names a
    config whose values this file's sections override key by key, so a variant (say, the mesh
    for one TPU slice) restates only what differs."""
    values = read_yaml(path)
    base = values.pop("base", None)
    if base is None:
        return values
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base: expected a config file name, got {base!r}")
    base_path = os.path.normpath(os.path.join(os.path.dirname(path), base))
    seen = _seen + (os.path.normpath(path),)
    if base_path in seen:
        raise ConfigError(f"{path}: base: {base} leads back to {base_path} (a cycle)")
    return _merge(read_config_values(base_path, seen), values)


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None,
                cls: type = ExperimentConfig) -> Any:
    """Loads a config from a YAML file (or defaults when `path` is None; its `base:` first)
    plus overrides."""
    values = read_config_values(path) if path else {}
    values = apply_overrides(values, list(overrides or []))
    try:
        return build_dataclass(cls, values)
    except ConfigError as e:
        source = path or "command line"
        raise ConfigError(f"{source}: {e}") from None


def to_dict(config: Any) -> dict:
    """The config as plain YAML-able data (tuples become lists)."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(config))
