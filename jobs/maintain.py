"""spark-submit entry point for `citylake maintain` (arguments as for the CLI).

    spark-submit jobs/maintain.py --help
"""

import sys

from citylake.cli import main

if __name__ == "__main__":
    sys.exit(main(["maintain", *sys.argv[1:]]))
