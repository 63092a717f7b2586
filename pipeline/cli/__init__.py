"""The command line: argparse, signals, GC tuning and all printing. ``asyncio.run`` lives only here."""

from pipeline.cli.app import main

__all__ = ["main"]
