"""The evaluation wing: sample quality (``fidelity``), normalized densities (``ais``, ``likelihood``),
out-of-distribution detection (``ood``) and the offline digits classifier (``digits``). It builds on the
core only: never on the training wing or the command-line layer."""
