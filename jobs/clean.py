"""spark-submit entry point for `citylake clean` (arguments as for the CLI).

    spark-submit jobs/clean.py --help
"""

import sys

from citylake.cli import main

if __name__ == "__main__":
    sys.exit(main(["clean", *sys.argv[1:]]))
