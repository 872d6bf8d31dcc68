"""`python -m alpamayo_jax.serving ...`: the `serve` command on its own (same flags and exit codes as
`alpamayo-jax serve`)."""

from __future__ import annotations

import argparse
import sys

from alpamayo_jax.serving.command import add_arguments, main


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alpamayo-jax serve", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return main(args)
    except (ValueError, OSError) as error:
        print(f"alpamayo-jax serve: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(run())
