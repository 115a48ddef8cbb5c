"""`python -m lmforge.cli` (and `torchrun -m lmforge.cli`): the same entry point as `lmforge`."""

from lmforge.cli import main

main()
