"""The training wing: one step (``step``), what it trains (``state``), the divergence guard (``guard``),
checkpoints (``checkpoint``), the run folder (``run_dir``) and the loop that ties them (``loop.run``).
Nothing here imports the CLI (cli/train.py parses the flags) or the evaluation wing.

The package imports none of its modules, so importing one (``cdrl.training.step``) loads only what it
needs."""
