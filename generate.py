"""Generation entry point: `python generate.py --checkpoint DIR --all_classes --output grid.png`."""

import sys

from cdrl.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
