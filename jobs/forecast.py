"""spark-submit entry point for `citylake forecast` (arguments as for the CLI).

    spark-submit jobs/forecast.py --help
"""

import sys

from citylake.cli import main

if __name__ == "__main__":
    sys.exit(main(["forecast", *sys.argv[1:]]))
