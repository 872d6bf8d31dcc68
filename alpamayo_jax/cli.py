"""Command line: `alpamayo-jax demo` (more subcommands arrive with conversion and inference)."""

from __future__ import annotations

import argparse
import sys
import time


def _demo(args: argparse.Namespace) -> int:
    """Runs the tiny-preset language model: a prompt prefill, then greedy decoding with the static
    KV cache, both jitted. Weights are random (seeded); the full pipeline replaces this later."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from alpamayo_jax.config import tiny
    from alpamayo_jax.models.text import CausalLM

    config = tiny().text
    model = CausalLM(config, rngs=nnx.Rngs(args.seed))
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, ids, cache):
        out = nnx.merge(graphdef, state)(ids, cache=cache, last_logits_only=True)
        return jnp.argmax(out.logits[:, -1], axis=-1), out.cache

    prompt = jax.random.randint(jax.random.key(args.seed), (1, args.prompt_length), 0, config.vocab_size)
    cache = model.init_cache(1, args.prompt_length + args.new_tokens)
    start = time.perf_counter()
    token, cache = forward(state, prompt, cache)
    tokens = [int(token[0])]
    for _ in range(args.new_tokens - 1):
        token, cache = forward(state, token[:, None], cache)
        tokens.append(int(token[0]))
    elapsed = time.perf_counter() - start
    print(f"tiny language model ({config.num_hidden_layers} layers, width {config.hidden_size}, "
          f"vocab {config.vocab_size}), random weights, seed {args.seed}")
    print(f"prompt of {args.prompt_length} random tokens -> {args.new_tokens} greedy tokens: {tokens}")
    print(f"KV cache: {int(cache.length)} of {cache.capacity} slots filled; "
          f"{elapsed:.2f} s including compilation")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alpamayo-jax", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the embedded tiny model (no downloads)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--prompt-length", type=int, default=16)
    demo.add_argument("--new-tokens", type=int, default=8)
    demo.set_defaults(run=_demo)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
