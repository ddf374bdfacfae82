"""Forward and forward+backward of SmolLM2-135M at 16 x 128 tokens: jaxcov vs transformers/torch.

    python bench/bench_model.py [--batch 16 --seq 128 --repeats 3 --compute-dtype float32]

Forward = per-token log-probs of the given tokens (what RL needs); forward+backward = gradient
of their mean. Both sides run in this process on the same weights (the embedded GGUF), their
calls interleaved (jaxcov fwd, torch fwd, jaxcov fwd+bwd, torch fwd+bwd, ...) so that a change
of load on the machine hits both alike; the best time of each is reported (see _best_times).
"""

import argparse
import os
import time

import numpy as np

from machine import machine_line


def _best_times(fns: dict, repeats: int) -> dict:
    """Best wall time of each callable over `repeats` interleaved rounds. In each round a
    callable runs twice and the second run is timed: torch's OpenMP threads keep spinning for a
    while after its last op, which would otherwise slow the first XLA call after a torch one."""
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            fn()
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def bench_jax(args, tokens, mask):
    import jax
    import jax.numpy as jnp

    from jaxcov.models.api import load_model
    from jaxcov.models.logprobs import token_logprobs
    from jaxcov.xla_cpu import model_compile_options

    model = load_model("smollm2-135m-instruct", dtype="float32",
                       compute_dtype=args.compute_dtype, remat=args.remat, with_tokenizer=False,
                       attention=args.attention)
    cfg, mesh = model.config, model.mesh
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)

    def mean_logp(params):
        logp, _ = token_logprobs(params, cfg, tokens, mask, mesh=mesh, chunk=args.chunk)
        return jnp.mean(logp[:, 1:])

    # Compiled as the trainer compiles its scoring and update programs.
    options = model_compile_options(args.compute_dtype)
    fwd = jax.jit(lambda p: token_logprobs(p, cfg, tokens, mask, mesh=mesh, chunk=args.chunk)[0],
                  compiler_options=options)
    bwd = jax.jit(jax.value_and_grad(mean_logp), compiler_options=options)
    t = time.perf_counter()
    fwd.lower(model.params).compile()
    compile_fwd = time.perf_counter() - t
    t = time.perf_counter()
    bwd.lower(model.params).compile()
    compile_bwd = time.perf_counter() - t
    calls = {"forward": lambda: jax.block_until_ready(fwd(model.params)),
             "forward+backward": lambda: jax.block_until_ready(bwd(model.params))}
    return calls, compile_fwd, compile_bwd


def bench_torch(args, tokens, mask):
    import torch
    import transformers

    from jaxcov.models.registry import embedded_model_path

    torch.set_num_threads(args.threads)
    path = embedded_model_path("smollm2-135m-instruct")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
    tokens, mask = torch.tensor(tokens), torch.tensor(mask)

    def mean_logp():
        logits = model(input_ids=tokens, attention_mask=mask).logits[:, :-1]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, tokens[:, 1:, None])
        return logp.mean()

    def fwd():
        with torch.no_grad():
            mean_logp()

    def bwd():
        model.zero_grad(set_to_none=True)
        mean_logp().backward()

    return {"forward": fwd, "forward+backward": bwd}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--remat", default="full")
    p.add_argument("--compute-dtype", default="float32")
    p.add_argument("--attention", default="auto", help="jaxcov's model.attention")
    p.add_argument("--skip-torch", action="store_true")
    args = p.parse_args()
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, 49152, (args.batch, args.seq))
    mask = np.ones_like(tokens)
    jax_calls, compile_fwd, compile_bwd = bench_jax(args, tokens, mask)
    calls = {("jaxcov", k): fn for k, fn in jax_calls.items()}
    if not args.skip_torch:
        calls.update({("torch", k): fn for k, fn in bench_torch(args, tokens, mask).items()})
    order = [(side, k) for k in jax_calls for side in ("jaxcov", "torch") if (side, k) in calls]
    best = _best_times({key: calls[key] for key in order}, args.repeats)
    print(f"SmolLM2-135M {args.batch}x{args.seq}, compute {args.compute_dtype}, remat {args.remat}, "
          f"attention {args.attention}, best of {args.repeats} interleaved")
    print(f"{'':18}{'jaxcov s':>10}{'torch s':>10}{'torch/jaxcov':>14}")
    for k in jax_calls:
        ours, theirs = best[("jaxcov", k)], best.get(("torch", k), float("nan"))
        print(f"{k:18}{ours:10.3f}{theirs:10.3f}{theirs / ours:14.2f}"
              f"   jaxcov {1e3 * ours / tokens.size:.2f} ms/token")
    print(f"compile: forward {compile_fwd:.1f} s, forward+backward {compile_bwd:.1f} s")
    print(machine_line())

if __name__ == "__main__":
    main()
