"""`python -m qwenvl.synthetic --out DIR --scenes N --seed S`: write a synthetic data set."""

import argparse
import logging
import sys

from .dataset import add_arguments, run_from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwenvl.synthetic", description=__doc__)
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
