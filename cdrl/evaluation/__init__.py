"""The evaluation wing: sample quality (``fidelity``), normalized densities (``ais``, ``likelihood``),
out-of-distribution detection (``ood``) and the offline digits classifier (``digits``). It builds on the
core and never imports ``cdrl.training`` or ``cdrl.cli``."""
