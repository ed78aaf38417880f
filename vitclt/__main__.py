"""`python -m vitclt` (and `torchrun ... -m vitclt`): the `vitclt` command."""

from vitclt.cli import main

main()
