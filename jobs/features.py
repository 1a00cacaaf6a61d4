"""spark-submit entry point for `citylake features` (arguments as for the CLI).

    spark-submit jobs/features.py --help
"""

import sys

from citylake.cli import main

if __name__ == "__main__":
    sys.exit(main(["features", *sys.argv[1:]]))
