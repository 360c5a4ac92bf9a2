"""`python -m lossgraph` runs the command line."""

from lossgraph.cli.app import run

run()
