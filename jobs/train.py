"""spark-submit entry point for `citylake train` (arguments as for the CLI).

    spark-submit jobs/train.py --help
"""

import sys

from citylake.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
