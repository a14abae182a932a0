"""Counts in a config have upper bounds (``cdrl.config.MAX_COUNTS``): a typo such as 10^12 steps is refused
before any work, with one line naming the key; the training command exits 2 and writes nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cdrl.config import MAX_COUNTS, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("key", sorted(MAX_COUNTS))
def test_a_count_above_its_bound_is_refused_naming_the_key(key):
    limit = MAX_COUNTS[key]
    overrides = [f"{key}={limit + 1}"]
    if key == "train.persistent_size":
        overrides.append("train.persistent_levels=1")
    with pytest.raises(ConfigError, match=rf"{key} must be at most {limit:,}"):
        load_config(None, overrides)


@pytest.mark.parametrize("key", sorted(MAX_COUNTS))
def test_a_count_at_its_bound_is_accepted(key):
    load_config(None, [f"{key}={MAX_COUNTS[key]}"])


def test_train_refuses_a_step_count_typo_with_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "--config",
            "debug",
            "--output_dir",
            str(out),
            "--max_train_steps",
            str(10**12),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: train.max_steps must be at most 1,000,000,000, got 1,000,000,000,000"]
    assert not out.exists()
