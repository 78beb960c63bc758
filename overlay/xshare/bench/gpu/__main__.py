"""``python -m xshare.bench.gpu ARGS``: the same as ``xshare bench gpu ARGS``."""

import sys

from xshare.cli import main

if __name__ == "__main__":  # not when multiprocessing's spawn re-imports the main module
    sys.exit(main(["bench", "gpu", *sys.argv[1:]]))
