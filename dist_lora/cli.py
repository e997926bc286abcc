"""The ``dist-lora`` command line."""

from __future__ import annotations

import argparse
import sys

from dist_lora import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dist-lora", description=__doc__)
    parser.add_argument("--version", action="version", version=f"dist-lora {__version__}")
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
