"""spark-submit entry point for `citylake ingest` (arguments as for the CLI).

    spark-submit jobs/ingest.py --help
"""

import sys

from citylake.cli import main

if __name__ == "__main__":
    sys.exit(main(["ingest", *sys.argv[1:]]))
