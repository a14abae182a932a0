"""Evaluation entry point: `python evaluate.py --checkpoint DIR --reference cifar10-train --output fid.json`."""

import sys

from cdrl.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
