"""`python -m lossgraph` runs the command line."""

from lossgraph.cli import run

run()
