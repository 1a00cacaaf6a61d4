"""spark-submit entry point for `citylake validate` (arguments as for the CLI).

    spark-submit jobs/validate.py --help
"""

import sys

from citylake.cli import main

if __name__ == "__main__":
    sys.exit(main(["validate", *sys.argv[1:]]))
