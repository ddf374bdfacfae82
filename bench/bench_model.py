"""Forward and forward+backward of SmolLM2-135M at 16 x 128 tokens: jaxcov vs transformers/torch.

    python bench/bench_model.py [--batch 16 --seq 128 --repeats 3 --compute-dtype float32]

Forward = per-token log-probs of the given tokens (what RL needs); forward+backward = gradient
of their mean. Both sides run in this process on the same weights (the embedded GGUF).
"""

import argparse
import os
import time

import numpy as np


def _time(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench_jax(args, tokens, mask):
    import jax
    import jax.numpy as jnp

    from jaxcov.models.api import load_model
    from jaxcov.models.logprobs import token_logprobs

    model = load_model("smollm2-135m-instruct", dtype="float32",
                       compute_dtype=args.compute_dtype, remat=args.remat, with_tokenizer=False)
    cfg, mesh = model.config, model.mesh
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)

    def mean_logp(params):
        logp, _ = token_logprobs(params, cfg, tokens, mask, mesh=mesh, chunk=args.chunk)
        return jnp.mean(logp[:, 1:])

    fwd = jax.jit(lambda p: token_logprobs(p, cfg, tokens, mask, mesh=mesh, chunk=args.chunk)[0])
    bwd = jax.jit(jax.value_and_grad(mean_logp))
    t = time.perf_counter()
    fwd.lower(model.params).compile()
    compile_fwd = time.perf_counter() - t
    t = time.perf_counter()
    bwd.lower(model.params).compile()
    compile_bwd = time.perf_counter() - t
    f = _time(lambda: jax.block_until_ready(fwd(model.params)), args.repeats)
    b = _time(lambda: jax.block_until_ready(bwd(model.params)), args.repeats)
    return f, b, compile_fwd, compile_bwd


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

    return _time(fwd, args.repeats), _time(bwd, args.repeats)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--remat", default="full")
    p.add_argument("--compute-dtype", default="float32")
    p.add_argument("--skip-torch", action="store_true")
    args = p.parse_args()
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, 49152, (args.batch, args.seq))
    mask = np.ones_like(tokens)
    jf, jb, cf, cb = bench_jax(args, tokens, mask)
    tf, tb = (float("nan"),) * 2 if args.skip_torch else bench_torch(args, tokens, mask)
    print(f"SmolLM2-135M {args.batch}x{args.seq}, compute {args.compute_dtype}, remat {args.remat}")
    print(f"{'':18}{'jaxcov s':>10}{'torch s':>10}{'torch/jaxcov':>14}")
    print(f"{'forward':18}{jf:10.3f}{tf:10.3f}{tf / jf:14.2f}")
    print(f"{'forward+backward':18}{jb:10.3f}{tb:10.3f}{tb / jb:14.2f}")
    print(f"compile: forward {cf:.1f} s, forward+backward {cb:.1f} s")


if __name__ == "__main__":
    main()
