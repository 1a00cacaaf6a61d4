"""spark-submit entry point for `citylake score` (arguments as for the CLI).

    spark-submit jobs/score.py --help
"""

import sys

from citylake.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
