"""The command line: argparse, signals, GC tuning and all printing; a front end, like :mod:`pipeline.api`."""

from pipeline.cli.app import main

__all__ = ["main"]
