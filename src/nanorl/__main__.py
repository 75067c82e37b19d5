"""`python -m nanorl` is the `nanorl` command."""

from nanorl.cli import main

main()
