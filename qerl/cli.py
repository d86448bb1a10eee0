"""`qerl` command line. Each subcommand is a thin wrapper over a Python API function.

User mistakes (bad config, missing file, unknown format) raise QerlError / ValueError /
OSError and are printed as one line with exit code 2, never a stack trace.
"""
from __future__ import annotations

import sys

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="RL for LLMs on NVFP4 weights with LoRA and AQN.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (rollout speed).")
app.add_typer(bench_app, name="bench")


def main():
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        app()
    except (ValueError, OSError, KeyError) as e:  # QerlError is a ValueError
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"qerl: error: {msg}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
