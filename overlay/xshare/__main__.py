"""``python -m xshare``: the ``xshare`` command line without an installed console script
(e.g. ``PYTHONPATH=overlay python -m xshare bench gpu`` on a machine where nothing is installed)."""

import sys

from xshare.cli import main

if __name__ == "__main__":  # not when multiprocessing's spawn re-imports the main module
    sys.exit(main())
