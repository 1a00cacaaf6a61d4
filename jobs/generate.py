"""spark-submit entry point for `citylake generate` (arguments as for the CLI).

    spark-submit jobs/generate.py --help
"""

import sys

from citylake.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
