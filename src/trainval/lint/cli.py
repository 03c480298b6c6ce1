"""Arguments and entry point of ``trainval lint``."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", help="Python files or folders")


def run(args) -> int:
    raise SystemExit("trainval lint is not implemented yet")
