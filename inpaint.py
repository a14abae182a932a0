"""Inpainting entry point: `python inpaint.py --checkpoint DIR --image PATH... --mask_preset center
--output DIR`.

Mask convention (diffusers): 1 / white = repaint, 0 / black = keep. See `cdrl-inpaint --help`.
"""

import sys

from cdrl.cli.inpaint import main

if __name__ == "__main__":
    sys.exit(main())
