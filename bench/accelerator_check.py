"""Accelerator check: attention kernel numerics on the device, SmolLM2 train-step and sampler
speed, MFU and decode bandwidth against the chip's peak. Bounded to a few minutes.

    python bench/accelerator_check.py [--budget 240 --repeats 3 --remat full]
    python bench/accelerator_check.py --smoke      # CPU: tiny random model, tiny shapes

`scripts/accelerator_check.sh` installs the accelerator jax first and then runs this. One chip
is used (a one-device mesh), so every ratio is per chip.

1. Numerics. The platform kernel (TPU: Pallas splash compiled for the chip, fp32 and bf16;
   GPU: cuDNN flash attention in bf16; both also `chunked` in fp32) against `attention.dense`
   in fp32 at matmul precision "highest", on the same (rounded) inputs, with left padding, a
   right-padded row, GQA and a sliding window; output and d q, d k, d v. Error = max |got -
   want| / max |want| (output over real query rows only). It passes under max(floor of its
   dtype, 4 x the error of `dense` run in the kernel's dtype at default precision), so bf16 and
   TF32 / one-pass-bf16 fp32 matmuls are not failures, while mask, padding or layout bugs are
   (a window one slot too wide, ignored padding or unrotated rows gave errors of 24-100% at
   these shapes, against ~3e-3 for bf16 rounding, when tried on CPU).
2. Train step: jit(value_and_grad(mean token log-prob)) as bench/bench_model.py, bf16 compute,
   fp32 parameters, attention "auto". Compile time = lower + compile; time = best of --repeats
   calls after one warm-up call.
3. Sampler: `jaxcov.sampler.sample` with no stop ids (every row runs to the limit), T=1, random
   prompts (no shared prefix). Time = whole call, prefill included; compile = first call - best.

Model FLOPs of one forward+backward (MFU = FLOPs / time / peak bf16 dense FLOP/s):
    6 * N * B * T  +  B * 12 * L * (T^2 / 2) * H * E
N counts the weights that multiply activations (a tied embedding once, as the output
projection; an untied input embedding is a lookup and is left out); the second term is causal
attention (QK^T and PV, 2 * 2 * T^2/2 * H * E multiply-adds forward, x3 with the backward; with a
sliding window W < T, T^2/2 becomes T*W - W^2/2). Rematerialisation is not counted (remat full
recomputes the forward, so hardware FLOPs are ~4/3 of these).

Decode bandwidth = bytes read per decode step * steps / time, against HBM bandwidth:
    bytes/step = N * itemsize  +  2 * L * R * K * S * E * itemsize
(every weight once, and the whole K and V cache of S = prompt + response slots, which the
sampler's two attention matmuls read every step); steps = new tokens - 1 (the first token comes
from the prefill). The time includes the prefill, so this is a lower bound.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time
from typing import Callable, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import machine_line  # noqa: E402

# (name, substrings of device_kind (lowercase, all required), bf16 dense FLOP/s, HBM bytes/s).
# First match wins. Vendor datasheet numbers (dense, no sparsity).
DEVICE_PEAKS = [
    ("H200", ("h200",), 989e12, 4.8e12),
    ("H100 PCIe", ("h100", "pcie"), 756e12, 2.0e12),
    ("H100 SXM", ("h100",), 989e12, 3.35e12),
    ("A100 80GB", ("a100", "80gb"), 312e12, 2.0e12),
    ("A100 40GB", ("a100",), 312e12, 1.555e12),
    ("TPU v6e", ("v6",), 918e12, 1640e9),
    ("TPU v5e", ("v5", "lite"), 197e12, 819e9),
    ("TPU v5e", ("v5e",), 197e12, 819e9),
    ("TPU v5p", ("v5",), 459e12, 2765e9),
    ("TPU v4", ("v4",), 275e12, 1228e9),
]


@dataclasses.dataclass(frozen=True)
class Peak:
    name: str
    flops: Optional[float]  # bf16 dense FLOP/s
    hbm: Optional[float]  # bytes/s


def device_peak(device_kind: str) -> Peak:
    """The chip's peak numbers by `device_kind` (None where the chip is not in the table)."""
    kind = device_kind.lower()
    for name, parts, flops, hbm in DEVICE_PEAKS:
        if all(p in kind for p in parts):
            return Peak(name, flops, hbm)
    return Peak(device_kind, None, None)


class Deadline:
    """Wall-clock budget of the whole check; pieces that would not fit are skipped."""

    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def best_time(fn: Callable[[], None], repeats: int, deadline: Deadline) -> float:
    """Best wall time of `repeats` calls after one warm-up call; fewer when time runs out."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
        if deadline.left() < 0:
            break
    return best


# ---------------------------------------------------------------------------------- numerics


@dataclasses.dataclass(frozen=True)
class Case:
    """Attention inputs: B rows of T tokens; row b starts with left_pad[b] padding slots and
    the last row ends with right_pad padding slots."""

    batch: int
    seq: int
    heads: int
    kv_heads: int
    head_dim: int
    window: Optional[int]
    left_pad: tuple[int, ...]
    right_pad: int = 0

    def label(self) -> str:
        return (f"{self.batch}x{self.seq} H{self.heads}/K{self.kv_heads} E{self.head_dim} "
                f"window {self.window} pads {self.left_pad}+{self.right_pad}")


DEVICE_CASES = [
    Case(2, 256, 9, 3, 64, None, (37, 0)),
    Case(2, 1024, 9, 3, 64, 31, (100, 0), right_pad=19),
    Case(2, 2048, 8, 2, 128, None, (511, 3), right_pad=64),
]
SMOKE_CASES = [
    Case(2, 128, 4, 2, 64, None, (37, 0)),
    Case(2, 128, 4, 2, 64, 17, (20, 0), right_pad=9),
]


def case_inputs(case: Case):
    """fp32 q [B, T, H, E], k, v [B, T, K, E], valid [B, T] and the output cotangent (zero on
    padding queries)."""
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(0), 4)
    B, T = case.batch, case.seq
    q = jax.random.normal(keys[0], (B, T, case.heads, case.head_dim))
    k, v = (jax.random.normal(key, (B, T, case.kv_heads, case.head_dim)) for key in keys[1:3])
    valid = np.ones((B, T), bool)
    for b, pad in enumerate(case.left_pad):
        valid[b, :pad] = False
    valid[-1, T - case.right_pad:] = False
    valid = jnp.asarray(valid)
    d_out = jax.random.normal(keys[3], q.shape) * valid[:, :, None, None]
    return q, k, v, valid, d_out


def output_and_grads(attend, q, k, v, valid, d_out):
    """(output, (d q, d k, d v)) of `attend`, jitted, all as fp32 numpy arrays."""
    import jax
    import jax.numpy as jnp

    def loss(q, k, v):
        return jnp.sum(attend(q, k, v, valid).astype(jnp.float32) * d_out)

    run = jax.jit(lambda q, k, v: (attend(q, k, v, valid), jax.grad(loss, (0, 1, 2))(q, k, v)))
    out, grads = run(q, k, v)
    as_np = lambda x: np.asarray(x.astype(jnp.float32))  # noqa: E731
    return as_np(out), tuple(map(as_np, grads))


def relative_errors(got, want, real_bt) -> dict:
    """max |got - want| / max |want| of the output (real query rows) and of each gradient."""
    rel = lambda g, w: float(np.abs(g - w).max() / np.abs(w).max())  # noqa: E731
    errors = {"out": rel(got[0][real_bt], want[0][real_bt])}
    errors.update({f"d{name}": rel(g, w) for name, g, w in zip("qkv", got[1], want[1])})
    return errors


def kernel_errors(attend, case: Case, dtype: str) -> tuple[dict, dict]:
    """(errors of `attend` in `dtype`, errors of dense in `dtype`) against fp32 dense at
    precision "highest", all on the same `dtype`-rounded inputs."""
    import jax
    import jax.numpy as jnp

    from jaxcov.models import attention as A

    q, k, v, valid, d_out = case_inputs(case)
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    dense = functools.partial(A.dense, spec=A.Spec("dense", case.window))
    with jax.default_matmul_precision("highest"):
        want = output_and_grads(dense, *(x.astype(jnp.float32) for x in (q, k, v)), valid, d_out)
    real = np.asarray(valid)
    got = relative_errors(output_and_grads(attend, q, k, v, valid, d_out), want, real)
    baseline = relative_errors(output_and_grads(dense, q, k, v, valid, d_out), want, real)
    return got, baseline


ERROR_FLOOR = {"float32": 1e-4, "bfloat16": 2e-2}


def platform_kernels(platform: str, smoke: bool) -> list[tuple[str, str, Callable]]:
    """(name, dtype, attend(q, k, v, valid, window)) of the kernels to check on `platform`."""
    from jaxcov.models import attention as A

    def through(impl, **spec):
        return lambda q, k, v, valid, window: A.attention(
            q, k, v, valid, A.Spec(impl, window, **spec))

    chunked = ("chunked", "float32", through("chunked", block=16 if smoke else 256))
    if platform == "tpu":
        splash = through("splash", platform="tpu")
        return [("splash", "float32", splash), ("splash", "bfloat16", splash), chunked]
    if platform == "cuda":
        return [("cudnn", "bfloat16", through("cudnn")), chunked]
    cudnn_via_xla = lambda q, k, v, valid, window: A.cudnn(  # noqa: E731
        q, k, v, valid, A.Spec("cudnn", window), implementation="xla")
    return [chunked, ("splash (interpret)", "float32", through("splash", platform="cpu")),
            ("cudnn (through XLA)", "bfloat16", cudnn_via_xla)]


def check_numerics(platform: str, smoke: bool, deadline: Deadline, reserve: float) -> str:
    """Prints one line per (kernel, case); returns "ok", "ok (n skipped)" or "FAILED"."""
    ok, skipped = True, 0
    print(f"\n## Attention numerics on {platform} (error = max|got - want| / max|want| vs "
          f"fp32 dense at precision highest; [dense in the same dtype])")
    for name, dtype, attend in platform_kernels(platform, smoke):
        for case in SMOKE_CASES if smoke else DEVICE_CASES:
            if deadline.left() < reserve:
                print(f"{name:20} {dtype:9} {case.label()}: skipped (time budget)")
                skipped += 1
                continue
            fn = functools.partial(attend, window=case.window)
            got, base = kernel_errors(fn, case, dtype)
            passed = all(got[key] <= max(ERROR_FLOOR[dtype], 4 * base[key]) for key in got)
            ok &= passed
            cells = "  ".join(f"{key} {got[key]:.1e} [{base[key]:.1e}]" for key in got)
            print(f"{name:20} {dtype:9} {case.label()}: {cells}  {'ok' if passed else 'FAIL'}")
    return "FAILED" if not ok else f"ok ({skipped} skipped)" if skipped else "ok"


# ------------------------------------------------------------------------ FLOPs and bytes


def matmul_params(params, cfg) -> int:
    """Weights that multiply activations: all but an untied input embedding (a lookup)."""
    import jax

    total = sum(int(x.size) for x in jax.tree.leaves(params))
    return total if cfg.tie_word_embeddings else total - cfg.vocab_size * cfg.hidden_size


def train_flops(n_params: int, cfg, batch: int, seq: int) -> float:
    """Model FLOPs of one forward+backward over batch x seq tokens (module docstring)."""
    window = cfg.sliding_window
    pairs = seq * seq / 2 if window is None or window >= seq else seq * window - window ** 2 / 2
    attention = 12 * cfg.num_layers * pairs * cfg.num_heads * cfg.head_dim
    return 6 * n_params * batch * seq + batch * attention


def decode_step_bytes(n_params: int, cfg, rows: int, cache_slots: int, itemsize: int) -> float:
    """HBM bytes one decode step reads: every weight once plus the whole K and V cache."""
    cache = 2 * cfg.num_layers * rows * cfg.num_kv_heads * cache_slots * cfg.head_dim
    return (n_params + cache) * itemsize


# --------------------------------------------------------------------------------- timings


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the summary table."""

    name: str
    seconds: float
    compile_s: float
    tokens_per_s: float
    achieved: float  # FLOP/s or bytes/s
    peak: Optional[float]
    unit: str  # "FLOP/s" | "B/s"
    ratio_name: str  # "MFU" | "of HBM"


def one_device_mesh():
    import jax

    from jaxcov.config import MeshConfig
    from jaxcov.sharding import make_mesh

    return make_mesh(MeshConfig(), devices=jax.devices()[:1])


def load_check_model(args):
    from jaxcov.models.api import load_model

    if args.smoke:
        return load_model("random:llama", mesh=one_device_mesh(), tokenizer="smollm2-135m-instruct",
                          compute_dtype=args.compute_dtype, attention="chunked", remat=args.remat,
                          with_tokenizer=False)
    return load_model("smollm2-135m-instruct", mesh=one_device_mesh(), dtype="float32",
                      compute_dtype=args.compute_dtype, attention="auto", remat=args.remat,
                      with_tokenizer=False)


def time_train_step(model, batch: int, seq: int, args, deadline: Deadline, peak: Peak) -> Row:
    """Forward+backward of the mean token log-prob over batch x seq random tokens."""
    import jax
    import jax.numpy as jnp

    from jaxcov.models.logprobs import token_logprobs
    from jaxcov.xla_cpu import model_compile_options

    cfg, mesh = model.config, model.mesh
    tokens = jax.random.randint(jax.random.key(1), (batch, seq), 0, cfg.vocab_size)
    mask = jnp.ones_like(tokens)

    def mean_logp(params, tokens, mask):
        logp, _ = token_logprobs(params, cfg, tokens, mask, mesh=mesh, chunk=args.logits_chunk)
        return jnp.mean(logp[:, 1:])

    step = jax.jit(jax.value_and_grad(mean_logp),
                   compiler_options=model_compile_options(cfg.compute_dtype))
    start = time.perf_counter()
    compiled = step.lower(model.params, tokens, mask).compile()
    compile_s = time.perf_counter() - start
    seconds = best_time(lambda: jax.block_until_ready(compiled(model.params, tokens, mask)),
                        args.repeats, deadline)
    flops = train_flops(matmul_params(model.params, cfg), cfg, batch, seq)
    return Row(f"train fwd+bwd {batch}x{seq}", seconds, compile_s, batch * seq / seconds,
               flops / seconds, peak.flops, "FLOP/s", "MFU")


def time_sampler(model, args, deadline: Deadline, peak: Peak) -> Row:
    """`sampler.sample` of args.prompts x args.samples rows, args.new_tokens each, T=1."""
    import jax

    from jaxcov import sampler
    from jaxcov.config import SamplerConfig

    cfg = model.config
    rng = np.random.RandomState(0)
    prompts = rng.randint(0, cfg.vocab_size, (args.prompts, args.prompt_len)).tolist()
    config = SamplerConfig(max_new_tokens=args.new_tokens, temperature=1.0,
                           compute_dtype=cfg.compute_dtype, max_prompt_len=args.prompt_len)
    keys = iter(jax.random.split(jax.random.key(2), 100))
    rows = args.prompts * args.samples

    def run():
        out = sampler.sample(model.params, cfg, model.mesh, prompts, next(keys), config,
                             n=args.samples, stop_ids=(), pad_id=0)
        assert int(jax.block_until_ready(out.response_mask).sum()) == rows * args.new_tokens

    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    seconds = best_time(run, args.repeats, deadline)
    slots = (sampler.bucket(args.prompt_len, config.min_bucket, config.max_prompt_len)
             + sampler.bucket(args.new_tokens, config.min_bucket))
    step_bytes = decode_step_bytes(matmul_params(model.params, cfg), cfg, rows, slots,
                                   np.dtype(cfg.dtype).itemsize)
    return Row(f"sampler {rows} rows x {args.new_tokens} new", seconds, first - seconds,
               rows * args.new_tokens / seconds, step_bytes * (args.new_tokens - 1) / seconds,
               peak.hbm, "B/s", "of HBM")


# ---------------------------------------------------------------------------------- report


def _si(value: Optional[float], unit: str) -> str:
    if value is None:
        return "-"
    return f"{value / 1e12:.1f} T{unit}" if value >= 1e11 else f"{value / 1e9:.2f} G{unit}"


def print_table(rows: list[Row], peak: Peak):
    print(f"\n## Summary ({peak.name}; peak = datasheet bf16 dense FLOP/s or HBM bandwidth "
          f"of one chip)\n")
    print("| measurement | best s | compile s | tokens/s | achieved | peak | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{100 * r.achieved / r.peak:.1f}% {r.ratio_name}" if r.peak else "-"
        print(f"| {r.name} | {r.seconds:.4f} | {r.compile_s:.1f} | {r.tokens_per_s:,.0f} | "
              f"{_si(r.achieved, r.unit)} | {_si(r.peak, r.unit)} | {ratio} |")


def print_environment():
    import jax

    device = jax.devices()[0]
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
    print(f"device_kind {device.device_kind!r}, platform version "
          f"{getattr(device.client, 'platform_version', '?')}")
    print(machine_line())


def print_model(model, requested: str):
    cfg = model.config
    print(f"\n## Model: {cfg.num_layers} layers, hidden {cfg.hidden_size}, heads "
          f"{cfg.num_heads}/{cfg.num_kv_heads}, vocab {cfg.vocab_size}, compute "
          f"{cfg.compute_dtype}, remat {cfg.remat}, platform {cfg.platform}")
    print(f"attention implementation chosen: {cfg.attention} (model.attention {requested})")


def run_timings(model, args, deadline: Deadline, peak: Peak) -> list[Row]:
    """The train steps and the sampler, each skipped when too little of the budget is left."""
    rows = []
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.train_shapes.split(",")]
    pieces = [(f"train {b}x{t}", functools.partial(time_train_step, model, b, t))
              for b, t in shapes]
    # The sampler second, so that the longest train shape is the one a tight budget drops.
    pieces.insert(1, ("sampler", functools.partial(time_sampler, model)))
    for name, piece in pieces:
        if deadline.left() < args.min_piece_s:
            print(f"{name}: skipped ({max(0.0, deadline.left()):.0f} s of the budget left)")
            continue
        row = piece(args, deadline, peak)
        print(f"{row.name}: best {row.seconds:.4f} s, compile {row.compile_s:.1f} s, "
              f"{row.tokens_per_s:,.0f} tokens/s, {_si(row.achieved, row.unit)}", flush=True)
        rows.append(row)
    return rows


SMOKE_DEFAULTS = dict(train_shapes="2x64,1x256", prompts=2, samples=2, prompt_len=16,
                      new_tokens=16, budget=600.0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true",
                   help="CPU smoke run: random:llama, tiny shapes, chunked attention")
    p.add_argument("--budget", type=float, default=240.0, help="seconds for the whole check")
    p.add_argument("--min-piece-s", type=float, default=45.0,
                   help="skip a timing piece when less than this much budget is left")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--remat", default="full", help="the trainer's default")
    p.add_argument("--compute-dtype", default="bfloat16")
    p.add_argument("--logits-chunk", type=int, default=128, help="model.logits_chunk")
    p.add_argument("--train-shapes", default="16x1024,4x8192", help="BxT,BxT,...")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=8, help="rows per prompt (rows = prompts x n)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--skip-numerics", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:  # smoke sizes replace the defaults, not values given on the command line
        given = {a.lstrip("-").split("=")[0].replace("-", "_") for a in (argv or sys.argv[1:])}
        for key, value in SMOKE_DEFAULTS.items():
            if key not in given:
                setattr(args, key, value)
    return args


def main(argv=None) -> int:
    start = time.perf_counter()
    args = parse_args(argv)
    if args.smoke:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from jaxcov.models import attention as A

    deadline = Deadline(args.budget)
    platform = A.platform_of(jax.default_backend())
    if platform == "cpu" and not args.smoke:
        print("no accelerator: jax's backend is cpu (run with --smoke for the CPU smoke test)")
        return 2
    peak = device_peak(jax.devices()[0].device_kind)
    print(f"# Accelerator check{' (SMOKE: CPU, tiny random model)' if args.smoke else ''}")
    print_environment()
    numerics = "skipped" if args.skip_numerics else check_numerics(
        platform, args.smoke, deadline, reserve=args.budget / 2)
    model = load_check_model(args)
    print_model(model, "chunked" if args.smoke else "auto")
    rows = run_timings(model, args, deadline, peak)
    print_table(rows, peak)
    print(f"\nnumerics {numerics}; whole check {time.perf_counter() - start:.0f} s (budget "
          f"{args.budget:.0f} s)")
    return 1 if numerics == "FAILED" else 0


if __name__ == "__main__":
    sys.exit(main())
