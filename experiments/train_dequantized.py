"""``train.py`` on uniformly dequantized data (issue 17): the lowest level learns the density the bound scores.

Kept for the commands recorded in ``experiments/results/density.md``; it is now ``train.py`` with
``--set data.dequantize=true`` (``cdrl.data.dequantize``: each access returns x' = (k + u) / 17 * 2 - 1,
u ~ U[0, 1) afresh, for a digit's grey level k; the map ``cdrl.evaluation.bpd.bits_per_dim`` scores with).
Until 2026-12-07 it wrapped the training set itself with the same map and the same draws.

Usage: the same flags as train.py, e.g.
  python experiments/train_dequantized.py --config digits --output_dir /work/runs/d17_deq --report_to none
"""

from __future__ import annotations

import sys

import cdrl.cli.train as train_cli

if __name__ == "__main__":
    sys.exit(train_cli.main(["--set", "data.dequantize=true", *sys.argv[1:]]))
