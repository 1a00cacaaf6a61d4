"""spark-submit entry point for `citylake backtest` (arguments as for the CLI).

    spark-submit jobs/backtest.py --help
"""

import sys

from citylake.cli import main

if __name__ == "__main__":
    sys.exit(main(["backtest", *sys.argv[1:]]))
