"""Training entry point: `accelerate launch train.py --config configs/digits.yaml [flags]`."""

import sys

from cdrl.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
