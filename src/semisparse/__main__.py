"""`python -m semisparse` runs the CLI."""

from semisparse.cli import main

main()
