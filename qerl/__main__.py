"""`python -m qerl ...` (and `torchrun --nproc-per-node N -m qerl train ...`): the `qerl` command line."""

from .cli import main

main()
