"""spark-submit entry point for `citylake run` (arguments as for the CLI).

    spark-submit jobs/run.py --help
"""

import sys

from citylake.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
