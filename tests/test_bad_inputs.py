"""Bad input across the CLIs (issue 8): every case exits with code 2 and one line ``error: ...`` that names
the problem, prints nothing on stdout, and writes nothing.

``CASES`` is the table: one row per bad input, all run by ``test_bad_input``. A row names the script, a
function that prepares what it needs in the case's folder and returns the arguments, and a fragment the
error line must contain. Rows marked ``memory_limit`` run in a fresh process whose address space is
capped a little above what it already maps, so that a batch too large for the machine fails the way it
would on a small one, without touching this machine's memory.

To add rows for another CLI (``cdrl-evaluate``): add it to ``SCRIPTS`` (``"evaluate": "cdrl.cli.evaluate"``),
add it to the forkserver preload in conftest.py's ``fresh_process`` if it gets ``memory_limit`` rows,
and append ``Case("evaluate-...", "evaluate", lambda env: [...], "fragment")`` rows; ``Env`` already
prepares pipelines (``env.pipeline("cond")``), image folders, corrupt files and foreign folders.
"""

from __future__ import annotations

import importlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs/debug.yaml"
SCRIPTS = {
    "train": "cdrl.cli.train",
    "generate": "cdrl.cli.generate",
    "inpaint": "cdrl.cli.inpaint",
    "calibrate": "cdrl.cli.calibrate",
    "evaluate": "cdrl.cli.evaluate",
    "export": "cdrl.cli.export",
}
TOY = ["data.name=checkerboard", "ebm.arch=mlp", "initializer.arch=mlp"]
HUGE = str(2**40)  # samples: 2**40 8x8 images need 256 TiB
T12 = str(10**12)
SCHEDULER = "scheduler/scheduler_config.json"
LONG = "n" * 300  # a file name longer than any file system allows (ENAMETOOLONG)
# "billion laughs": nine aliases deep, 9**9 list entries once expanded (and in any repr of the value)
ALIAS_BOMB = (
    "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
    + "".join(
        f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n"
        for p, n in zip("abcdefgh", "bcdefghi", strict=True)
    )
    + "ebm: {channel_mult: *i}\n"
)


class _Payload:
    """Unpickling this creates a file: proof that a pickle was (or was not) executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@dataclass
class Env:
    """The folder of one case; every path a case names lives under ``tmp`` (snapshotted)."""

    tmp: Path
    sources: dict[str, Path]  # finished_run, uncond, cond: prepared once per module

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def train(self, *args, config: Path = DEBUG, out: Path | None = None) -> list:
        """train.py arguments: ``config`` (configs/debug.yaml) into ``out`` (default: a new folder)."""
        out = self.out if out is None else out
        return ["--config", config, "--output_dir", out, "--report_to", "none", *args]

    def copy(self, name: str) -> Path:
        """A copy of a prepared source: 'finished_run' (debug.yaml, 2 steps), 'uncond' or 'cond'."""
        target = self.tmp / name
        if not target.exists():
            shutil.copytree(self.sources[name], target)
        return target

    def pipeline(self, kind: str = "uncond") -> Path:
        return self.copy(kind)

    def write(self, name: str, text: str) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def folder(self, name: str, *, notes: bool = False, manifest: bool = False) -> Path:
        """An empty folder, or one holding only a text file (not ours, not images); with ``manifest``
        also a manifest.json of the user's own, which must not make the folder look like ours."""
        path = self.tmp / name
        path.mkdir(parents=True, exist_ok=True)
        if notes:
            (path / "notes.txt").write_text("my thesis\n")
        if manifest:
            (path / "manifest.json").write_text('{"photos": ["holiday.jpg"]}\n')
        return path

    def images(self, name: str = "images", count: int = 20, *, bad: str | None = None) -> Path:
        """A folder of ``count`` random 8x8 greyscale PNGs, plus a 'corrupt' or 'truncated' one."""
        folder = self.folder(name)
        rng = np.random.default_rng(0)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(
                folder / f"{i:03d}.png"
            )
        if bad == "corrupt":
            self.corrupt(f"{name}/bad.png")
        elif bad == "truncated":
            self.truncated(f"{name}/cut.png")
        return folder

    def corrupt(self, name: str) -> Path:
        """A file with a PNG signature and garbage after it."""
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
        return path

    def truncated(self, name: str) -> Path:
        """A PNG cut in half (a copy interrupted)."""
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        array = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(array).save(path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return path

    def tampered_run(self, file: str) -> Path:
        """The finished run with ``file`` of checkpoint-2 replaced by a code-running pickle."""
        run = self.copy("finished_run")
        checkpoint = run / "checkpoint-2"
        torch.save(_Payload(self.tmp / "executed"), checkpoint / file)
        marker = json.loads((checkpoint / "checkpoint.json").read_text())
        marker["files"][file] = (checkpoint / file).stat().st_size  # only the content lies
        (checkpoint / "checkpoint.json").write_text(json.dumps(marker))
        return run

    def edited_config(self, kind: str, **changes) -> Path:
        """A pipeline copy whose ebm/config.json was edited."""
        folder = self.pipeline(kind)
        path = folder / "ebm" / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
        return folder

    def pickle_weights(self, kind: str = "uncond") -> Path:
        """A pipeline copy whose EBM weights are a (code-running) pickle instead of safetensors."""
        folder = self.pipeline(kind)
        (folder / "ebm" / "diffusion_pytorch_model.safetensors").unlink()
        torch.save(_Payload(self.tmp / "executed"), folder / "ebm" / "diffusion_pytorch_model.bin")
        return folder

    def garbage_weights(self, kind: str = "uncond") -> Path:
        folder = self.pipeline(kind)
        (folder / "ebm" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 64)
        return folder

    def inpaint(self, *args, checkpoint=None, image=None, output=None) -> list:
        """cdrl-inpaint arguments: the uncond pipeline, one image, into ``out`` (unless given)."""
        checkpoint = self.pipeline() if checkpoint is None else checkpoint
        image = self.images("inputs", count=1) if image is None else image
        output = self.out if output is None else output
        return ["--checkpoint", checkpoint, "--image", image, "--output", output, *args]


@dataclass(frozen=True)
class Case:
    """One bad input: the script, its arguments (prepared in the case's folder), the error's fragment."""

    id: str
    script: str  # a key of SCRIPTS
    args: Callable[[Env], list]
    says: str  # the one-line error contains this
    memory_limit: int | None = None  # bytes of address space allowed above what the process maps

    def param(self):
        return pytest.param(self, id=self.id, marks=[pytest.mark.slow] if self.memory_limit else [])


def _run_info(env: Env) -> list:
    return env.train("--resume_from_checkpoint", "latest", out=env.copy("finished_run"))


CASES = [
    # ---- train: unknown or mistyped keys and flags
    Case(
        "train-unknown-key",
        "train",
        lambda e: e.train("--set", "train.no_such_key=1"),
        "unknown config key 'train.no_such_key'",
    ),
    Case(
        "train-mistyped-key",
        "train",
        lambda e: e.train("--set", "train.batchsize=8"),
        "did you mean 'train.batch_size'?",
    ),
    Case(
        "train-mistyped-section",
        "train",
        lambda e: e.train("--set", "trian.batch_size=8"),
        "did you mean 'train.batch_size'?",
    ),
    Case(
        "train-unknown-yaml-key",
        "train",
        lambda e: e.train(config=e.write("c.yaml", "train: {batchsize: 8}\n")),
        "unknown config key 'train.batchsize'",
    ),
    Case(
        "train-unknown-flag",
        "train",
        lambda e: e.train("--max_steps", "5"),
        "unrecognized arguments: --max_steps 5 (did you mean --max_train_steps?)",
    ),
    Case(
        "train-abbreviated-flag",
        "train",
        lambda e: e.train("--max_train", "5"),
        "unrecognized arguments: --max_train",
    ),
    Case(
        "train-override-not-key-value",
        "train",
        lambda e: e.train("--set", "train.batch_size"),
        "is not key=value",
    ),
    # ---- train: wrong types
    Case(
        "train-batch-not-integer",
        "train",
        lambda e: e.train("--train_batch_size", "abc"),
        "'train.batch_size' must be an integer, got 'abc'",
    ),
    Case(
        "train-batch-fractional",
        "train",
        lambda e: e.train("--train_batch_size", "1.5"),
        "'train.batch_size' must be an integer, got 1.5",
    ),
    Case(
        "train-lr-not-number",
        "train",
        lambda e: e.train("--learning_rate", "fast"),
        "'train.ebm_lr' must be a number",
    ),
    Case(
        "train-bool-not-bool",
        "train",
        lambda e: e.train("--set", "langevin.noise=maybe"),
        "'langevin.noise' must be true or false",
    ),
    Case(
        "train-list-not-list",
        "train",
        lambda e: e.train("--set", "ebm.channel_mult=3"),
        "'ebm.channel_mult' must be a list",
    ),
    Case(
        "train-unknown-choice",
        "train",
        lambda e: e.train("--mixed_precision", "fp8"),
        "'train.mixed_precision' must be one of",
    ),
    Case(
        "train-section-not-mapping",
        "train",
        lambda e: e.train("--set", "train=3"),
        "'train' is a section",
    ),
    # ---- train: impossible values
    Case(
        "train-negative-steps",
        "train",
        lambda e: e.train("--max_train_steps", "-5"),
        "train.max_steps must be >= 1",
    ),
    Case(
        "train-batch-0",
        "train",
        lambda e: e.train("--train_batch_size", "0"),
        "train.batch_size must be >= 1",
    ),
    Case(
        "train-T-0",
        "train",
        lambda e: e.train("--set", "schedule.num_levels=0"),
        "schedule.num_levels must be >= 1",
    ),
    Case(
        "train-negative-langevin-steps",
        "train",
        lambda e: e.train("--set", "langevin.n_steps=-1"),
        "langevin.n_steps must be >= 0",
    ),
    Case(
        "train-lr-0",
        "train",
        lambda e: e.train("--learning_rate", "0"),
        "train.ebm_lr and train.init_lr must be > 0",
    ),
    Case(
        "train-lr-nan",
        "train",
        lambda e: e.train("--learning_rate", "nan"),
        "train.ebm_lr and train.init_lr must be > 0",
    ),
    Case(
        "train-steps-inf",
        "train",
        lambda e: e.train("--max_train_steps", ".inf"),
        "'train.max_steps' must be an integer",
    ),
    Case(
        "train-ema-decay-1",
        "train",
        lambda e: e.train("--set", "train.ema_decay=1"),
        "train.ema_decay must be in [0, 1)",
    ),
    Case(
        "train-negative-checkpointing",
        "train",
        lambda e: e.train("--checkpointing_steps", "-2"),
        "log.checkpointing_steps must be >= 0",
    ),
    Case(
        "train-negative-workers",
        "train",
        lambda e: e.train("--set", "data.num_workers=-1"),
        "data.num_workers must be >= 0",
    ),
    Case(
        "train-guard-lr-factor",
        "train",
        lambda e: e.train("--set", "guard.lr_factor=1.5"),
        "guard.lr_factor must be in (0, 1)",
    ),
    Case(
        "train-guard-bad-steps-0",
        "train",
        lambda e: e.train("--set", "guard.max_bad_steps=0"),
        "guard.max_bad_steps must be >= 1",
    ),
    Case(
        "train-groups-do-not-divide",
        "train",
        lambda e: e.train("--set", "initializer.norm_num_groups=3"),
        "the networks cannot be built from this config",
    ),
    # ---- train: config files
    Case(
        "train-missing-config",
        "train",
        lambda e: e.train(config=e.tmp / "missing.yaml"),
        "config file not found",
    ),
    Case(
        "train-config-not-yaml",
        "train",
        lambda e: e.train(config=e.write("c.yaml", "train: [unclosed\n")),
        "is not valid YAML",
    ),
    Case(
        "train-config-not-mapping",
        "train",
        lambda e: e.train(config=e.write("c.yaml", "- 1\n- 2\n")),
        "must hold a mapping",
    ),
    # ---- train: config files the YAML loader must refuse early (class B: refused late or never; class C:
    # tracebacks), and numbers that must be finite (class A)
    Case(
        "train-config-alias-bomb",
        "train",
        lambda e: e.train(config=e.write("c.yaml", ALIAS_BOMB)),
        "aliases (*a) are not allowed in a config",
    ),
    Case(
        "train-set-alias",
        "train",
        lambda e: e.train("--set", "ebm.channel_mult=[&x [1, 2], *x]"),
        "aliases (*x) are not allowed in a config",
    ),
    Case(
        "train-config-python-tag",
        "train",
        lambda e: e.train(config=e.write("c.yaml", "train: {seed: !!python/name:os.system }\n")),
        "tags ('tag:yaml.org,2002:python/name:os.system') are not allowed",
    ),
    Case(
        "train-set-python-tag",
        "train",
        lambda e: e.train("--set", "log.report_to=!!python/object/apply:os.system [ls]"),
        "is not valid YAML: tags",
    ),
    Case(
        "train-set-binary-tag",
        "train",
        lambda e: e.train("--set", "log.report_to=!!binary aGk="),
        "tags ('tag:yaml.org,2002:binary') are not allowed",
    ),
    Case(
        "train-set-not-yaml",
        "train",
        lambda e: e.train("--set", "ebm.channel_mult=[1, 2"),
        "override 'ebm.channel_mult=[1, 2' is not valid YAML",
    ),
    Case(
        "train-config-not-utf8",
        "train",
        lambda e: e.train(config=_write_bytes(e, "c.yaml", "train: {seed: 1}\n".encode("utf-16"))),
        "is not UTF-8 text",
    ),
    Case(
        "train-config-name-too-long",
        "train",
        lambda e: e.train(config=e.tmp / f"{LONG}.yaml"),
        "cannot be read: File name too long",
    ),
    Case(
        "train-config-symlink-loop",
        "train",
        lambda e: e.train(config=_symlink_loop(e)),
        "cannot be read: Too many levels of symbolic links",
    ),
    Case(
        "train-huge-value-in-message",
        "train",
        lambda e: e.train("--set", f"ebm.channel_mult=[{'9' * 5000}x]"),
        "'ebm.channel_mult' must be an integer, got '99999",
    ),
    Case(
        "train-output-name-too-long",
        "train",
        lambda e: e.train(out=e.tmp / LONG / "run"),
        "log.output_dir holds a name of 300 bytes",
    ),
    Case(
        "train-data-dir-name-too-long",
        "train",
        lambda e: e.train("--set", "data.name=folder", f"data.data_dir={e.tmp / LONG}"),
        "data.data_dir holds a name of 300 bytes",
    ),
    Case(
        "train-lr-inf",
        "train",
        lambda e: e.train("--set", "train.ebm_lr=inf"),
        "train.ebm_lr must be a finite number, got inf",
    ),
    Case(
        "train-init-lr-inf",
        "train",
        lambda e: e.train("--set", "train.init_lr=.inf"),
        "train.init_lr must be a finite number, got inf",
    ),
    Case(
        "train-data-scale-inf",
        "train",
        lambda e: e.train("--set", "data.scale=.inf"),
        "data.scale must be a finite number",
    ),
    Case(
        "train-logsnr-inf",
        "train",
        lambda e: e.train("--set", "schedule.logsnr_max=.inf"),
        "schedule.logsnr_max must be a finite number",
    ),
    # ---- train: data
    Case(
        "train-unknown-dataset",
        "train",
        lambda e: e.train("--set", "data.name=imagenet"),
        "unknown data set data.name='imagenet'",
    ),
    Case(
        "train-folder-without-data-dir",
        "train",
        lambda e: e.train("--set", "data.name=folder"),
        "needs data.data_dir",
    ),
    Case(
        "train-missing-data-folder",
        "train",
        lambda e: e.train("--set", "data.name=folder", f"data.data_dir={e.tmp / 'nowhere'}"),
        "does not exist",
    ),
    Case(
        "train-missing-cifar10",
        "train",
        lambda e: e.train(
            "--set",
            "data.name=cifar10",
            "data.download=false",
            f"data.data_dir={e.tmp / 'nowhere'}",
        ),
        "CIFAR-10 not found or corrupted",
    ),
    Case(
        "train-empty-data-folder",
        "train",
        lambda e: e.train(
            "--set", "data.name=folder", f"data.data_dir={e.folder('d', notes=True)}"
        ),
        "no images",
    ),
    Case(
        "train-corrupt-image",
        "train",
        lambda e: e.train("--set", "data.name=folder", f"data.data_dir={e.images(bad='corrupt')}"),
        "cannot read image",
    ),
    Case(
        "train-truncated-image",
        "train",
        lambda e: e.train(
            "--set", "data.name=folder", f"data.data_dir={e.images(bad='truncated')}"
        ),
        "cannot read image",
    ),
    Case(
        "train-empty-toy",
        "train",
        lambda e: e.train("--set", *TOY, "data.toy_size=0"),
        "data.toy_size must be >= 1",
    ),
    Case(
        "train-batch-larger-than-data",
        "train",
        lambda e: e.train("--train_batch_size", "5000"),
        "fewer than train.batch_size=5000",
    ),
    Case(
        "train-labels-without-labels",
        "train",
        lambda e: e.train("--set", *TOY, "data.class_conditional=true"),
        "has no labels",
    ),
    # ---- train: output folder
    Case(
        "train-output-not-ours",
        "train",
        lambda e: e.train(out=e.folder("mine", notes=True)),
        "exists and is not a cdrl run",
    ),
    Case(
        "train-output-is-a-file",
        "train",
        lambda e: e.train(out=e.write("a_file", "x")),
        "is a file",
    ),
    Case(
        "train-output-under-a-file",
        "train",
        lambda e: e.train(out=e.write("f", "x") / "run"),
        "is a file, not a folder",
    ),
    Case(
        "train-existing-run-without-resume",
        "train",
        lambda e: e.train(out=e.copy("finished_run")),
        "already holds a run",
    ),
    # ---- train: resuming
    Case(
        "train-resume-nonsense",
        "train",
        lambda e: e.train("--resume_from_checkpoint", "nonsense"),
        "no checkpoint-N folder there",
    ),
    Case(
        "train-resume-incomplete-checkpoint",
        "train",
        lambda e: e.train("--resume_from_checkpoint", "checkpoint-2", out=_without_marker(e)),
        "it has no checkpoint.json (it was not completely written)",
    ),
    Case(
        "train-resume-config-not-matching-weights",
        "train",
        lambda e: [*_run_info(e), "--set", "ebm.base_channels=16"],
        "cannot resume: ebm.base_channels is 16 now but the run was trained with 8",
    ),
    Case(
        "train-resume-without-initializer",
        "train",
        lambda e: [*_run_info(e), "--set", "initializer.arch=none", "schedule.kind=drl"],
        "cannot resume: schedule.kind is 'drl' now but the run was trained with 'cdrl'",
    ),
    Case(
        "train-resume-pickle-payload",
        "train",
        lambda e: e.train(
            "--resume_from_checkpoint", "latest", out=e.tampered_run("optimizer.bin")
        ),
        "optimizer.bin was refused",
    ),
    # ---- train: out of memory
    Case(
        "train-out-of-memory-huge-batch",
        "train",
        lambda e: e.train(
            "--train_batch_size",
            "262144",
            "--set",
            *TOY,
            "data.toy_size=262144",
            "ebm.hidden=1024",
            "initializer.hidden=1024",
        ),
        "out of memory",
        memory_limit=2**30,
    ),
    # a grid of 2**50 samples was an allocation failure; the count's bound now refuses it first
    Case(
        "train-huge-grid",
        "train",
        lambda e: e.train("--set", f"log.num_grid_samples={2**50}"),
        "log.num_grid_samples must be at most 10,000, got 1,125,899,906,842,624",
    ),
    # ---- train: gradient accumulation and the Hub (issue 18)
    Case(
        "train-grad-accum-0",
        "train",
        lambda e: e.train("--gradient_accumulation_steps", "0"),
        "train.gradient_accumulation_steps must be >= 1",
    ),
    Case(
        "train-grad-accum-10-to-12",
        "train",
        lambda e: e.train("--gradient_accumulation_steps", T12),
        "train.gradient_accumulation_steps must be at most 10,000, got 1,000,000,000,000",
    ),
    Case(
        "train-grad-accum-not-integer",
        "train",
        lambda e: e.train("--gradient_accumulation_steps", "two"),
        "'train.gradient_accumulation_steps' must be an integer, got 'two'",
    ),
    Case(
        "train-hub-model-id-without-push",
        "train",
        lambda e: e.train("--hub_model_id", "me/digits"),
        "--hub_model_id needs --push_to_hub",
    ),
    Case(
        "train-hub-token-without-push",
        "train",
        lambda e: e.train("--hub_token", "hf_x"),
        "--hub_token needs --push_to_hub",
    ),
    Case(
        "train-hub-token-with-wandb",
        "train",
        lambda e: e.train("--push_to_hub", "--hub_token", "hf_x", "--report_to", "wandb"),
        "--hub_token with --report_to wandb would expose the token",
    ),
    Case(
        "train-hub-bad-repo-id",
        "train",
        lambda e: e.train("--push_to_hub", "--hub_model_id", "a/b/c"),
        "--hub_model_id 'a/b/c' is not a Hub repository id",
    ),
    # ---- export (issue 18): cdrl-export --checkpoint RUN/checkpoint-N --output DIR
    Case(
        "export-missing-output-flag",
        "export",
        lambda e: ["--checkpoint", e.copy("finished_run") / "checkpoint-2"],
        "the following arguments are required: --output",
    ),
    Case(
        "export-missing-checkpoint",
        "export",
        lambda e: ["--checkpoint", e.tmp / "nowhere" / "checkpoint-2", "--output", e.out],
        "does not exist",
    ),
    Case(
        "export-run-folder",
        "export",
        lambda e: ["--checkpoint", e.copy("finished_run"), "--output", e.out],
        "is a run folder; give one of its checkpoint-N folders: its newest complete one is",
    ),
    Case(
        "export-pipeline-folder",
        "export",
        lambda e: ["--checkpoint", e.pipeline(), "--output", e.out],
        "is not a run's checkpoint-N folder",
    ),
    Case(
        "export-checkpoint-outside-a-run",
        "export",
        lambda e: ["--checkpoint", _lone_checkpoint(e), "--output", e.out],
        "is not inside a run folder",
    ),
    Case(
        "export-incomplete-checkpoint",
        "export",
        lambda e: ["--checkpoint", _without_marker(e) / "checkpoint-2", "--output", e.out],
        "it has no checkpoint.json (it was not completely written)",
    ),
    Case(
        "export-output-inside-the-run",
        "export",
        lambda e: [
            "--checkpoint",
            e.copy("finished_run") / "checkpoint-2",
            "--output",
            e.copy("finished_run") / "exported",
        ],
        "is inside the run folder",
    ),
    Case(
        "export-output-over-the-runs-pipeline",
        "export",
        lambda e: [
            "--checkpoint",
            e.copy("finished_run") / "checkpoint-2",
            "--output",
            e.copy("finished_run") / "pipeline",
        ],
        "cdrl-export never changes a run",
    ),
    Case(
        "export-output-not-ours",
        "export",
        lambda e: [
            "--checkpoint",
            e.copy("finished_run") / "checkpoint-2",
            "--output",
            e.folder("mine", notes=True),
        ],
        "is a folder cdrl did not write",
    ),
    Case(
        "export-garbage-ema",
        "export",
        lambda e: ["--checkpoint", _garbage_ema(e), "--output", e.out],
        "cannot be read",
    ),
    Case(
        "export-config-not-matching-weights",
        "export",
        lambda e: ["--checkpoint", _widened_run(e) / "checkpoint-2", "--output", e.out],
        "does not match its run's config.yaml: model.safetensors (ebm)",
    ),
    # ---- generate
    Case(
        "generate-training-checkpoint",
        "generate",
        lambda e: ["--checkpoint", e.copy("finished_run") / "checkpoint-2", "--output", e.out],
        "a training checkpoint is not an exported pipeline; export it with `cdrl-export --checkpoint",
    ),
    Case(
        "generate-unknown-flag",
        "generate",
        lambda e: ["--checkpoint", e.pipeline(), "--output", e.out, "--num_sample", "4"],
        "(did you mean --num_samples?)",
    ),
    Case(
        "generate-not-an-integer",
        "generate",
        lambda e: ["--checkpoint", e.pipeline(), "--output", e.out, "--num_samples", "abc"],
        "invalid int value: 'abc'",
    ),
    Case(
        "generate-batch-0",
        "generate",
        lambda e: ["--checkpoint", e.pipeline(), "--output", e.out, "--batch_size", "0"],
        "--batch_size must be at least 1",
    ),
    Case(
        "generate-negative-steps",
        "generate",
        lambda e: ["--checkpoint", e.pipeline(), "--output", e.out, "--num_langevin_steps", "-1"],
        "--num_langevin_steps must be >= 0",
    ),
    Case(
        "generate-label-out-of-range",
        "generate",
        lambda e: ["--checkpoint", e.pipeline("cond"), "--output", e.out, "--class_labels", "10"],
        "class label 10 is outside [0, 10)",
    ),
    Case(
        "generate-missing-checkpoint",
        "generate",
        lambda e: ["--checkpoint", e.tmp / "nowhere", "--output", e.out],
        "does not exist",
    ),
    Case(
        "generate-folder-without-pipeline",
        "generate",
        lambda e: ["--checkpoint", e.folder("empty"), "--output", e.out],
        "holds no exported pipeline",
    ),
    Case(
        "generate-pickle-weights",
        "generate",
        lambda e: ["--checkpoint", e.pickle_weights(), "--output", e.out],
        "holds pickle weights (diffusion_pytorch_model.bin), which are never loaded",
    ),
    Case(
        "generate-config-not-matching-weights",
        "generate",
        lambda e: ["--checkpoint", e.edited_config("uncond", base_channels=8), "--output", e.out],
        "ebm/config.json does not match its weights",
    ),
    Case(
        "generate-corrupt-weights",
        "generate",
        lambda e: ["--checkpoint", e.garbage_weights(), "--output", e.out],
        "is not a readable safetensors file",
    ),
    Case(
        "generate-output-not-ours",
        "generate",
        lambda e: ["--checkpoint", e.pipeline(), "--output", e.folder("mine", notes=True)],
        "is a folder cdrl did not write",
    ),
    Case(
        "generate-output-with-a-users-manifest",
        "generate",
        lambda e: [
            "--checkpoint",
            e.pipeline(),
            "--output",
            e.folder("photos", notes=True, manifest=True),
        ],
        "is a folder cdrl did not write",
    ),
    Case(
        "generate-out-of-memory-huge-batch",
        "generate",
        lambda e: [
            "--checkpoint",
            e.pipeline(),
            "--output",
            e.out,
            "--num_samples",
            "262144",
            "--batch_size",
            "262144",
            "--device",
            "cpu",
        ],
        "out of memory",
        memory_limit=2**29,
    ),
    # ---- generate: silent nan before (class A), refused late or never (class B), tracebacks (class C)
    Case(
        "generate-guidance-nan",
        "generate",
        lambda e: _gen(e, "cond", "--class_labels", "1", "--guidance_scale", "nan"),
        "--guidance_scale must be a finite number, got nan",
    ),
    Case(
        "generate-guidance-inf",
        "generate",
        lambda e: _gen(e, "cond", "--class_labels", "1", "--guidance_scale", "inf"),
        "--guidance_scale must be a finite number, got inf",
    ),
    Case(
        "generate-10-to-12-samples",
        "generate",
        lambda e: _gen(e, "uncond", "--num_samples", T12),
        "--num_samples must be at most 10,000,000, got 1,000,000,000,000",
    ),
    Case(
        "generate-10-to-12-per-class",
        "generate",
        lambda e: _gen(e, "cond", "--all_classes", "--num_samples_per_class", T12),
        "--num_samples_per_class must be at most 10,000,000",
    ),
    Case(
        "generate-too-many-in-all",
        "generate",
        lambda e: _gen(e, "cond", "--all_classes", "--num_samples_per_class", "2000000"),
        "10 classes x --num_samples_per_class 2,000,000 is more than 10,000,000 samples",
    ),
    Case(
        "generate-10-to-12-langevin-steps",
        "generate",
        lambda e: _gen(e, "uncond", "--num_langevin_steps", T12),
        "--num_langevin_steps must be at most 100,000",
    ),
    Case(
        "generate-device-without-gpu",
        "generate",
        lambda e: _gen(e, "uncond", "--device", "cuda:99"),
        "--device cuda:99: this machine has",
    ),
    Case(
        "generate-device-nonsense",
        "generate",
        lambda e: _gen(e, "uncond", "--device", "nonsense"),
        "--device 'nonsense' is not a torch device",
    ),
    Case(
        "generate-checkpoint-name-too-long",
        "generate",
        lambda e: ["--checkpoint", e.tmp / LONG, "--output", e.out],
        "File name too long",
    ),
    Case(
        "generate-output-name-too-long",
        "generate",
        lambda e: ["--checkpoint", e.pipeline(), "--output", e.tmp / f"{LONG}.png"],
        "File name too long",
    ),
    Case(
        "generate-output-folder-name-too-long",
        "generate",
        lambda e: ["--checkpoint", e.pipeline(), "--output", e.tmp / LONG / "x"],
        "File name too long",
    ),
    Case(
        "generate-checkpoint-symlink-loop",
        "generate",
        lambda e: ["--checkpoint", _symlink_loop(e), "--output", e.out],
        "does not exist",
    ),
    Case(
        "generate-config-json-is-a-list",
        "generate",
        lambda e: [
            "--checkpoint",
            _json_edit(e, "ebm/config.json", lambda c: [c]),
            "--output",
            e.out,
        ],
        "ebm/config.json: it must hold a JSON object, got list",
    ),
    Case(
        "generate-config-json-lacks-a-key",
        "generate",
        lambda e: [
            "--checkpoint",
            _json_edit(e, "ebm/config.json", lambda c: _drop(c, "sample_size")),
            "--output",
            e.out,
        ],
        "ebm/config.json: key 'sample_size' is missing",
    ),
    Case(
        "generate-initializer-config-lacks-a-key",
        "generate",
        lambda e: [
            "--checkpoint",
            _json_edit(e, "initializer/config.json", lambda c: _drop(c, "sample_size")),
            "--output",
            e.out,
        ],
        "initializer/config.json: key 'sample_size' is missing",
    ),
    Case(
        "generate-model-index-is-a-list",
        "generate",
        lambda e: [
            "--checkpoint",
            _json_edit(e, "model_index.json", lambda c: [c]),
            "--output",
            e.out,
        ],
        "model_index.json must hold a JSON object",
    ),
    Case(
        "generate-scheduler-zero-scale",
        "generate",
        lambda e: [
            "--checkpoint",
            _json_edit(e, SCHEDULER, lambda c: {**c, "data_scale": 0}),
            "--output",
            e.out,
        ],
        "scheduler_config.json: data_scale must be > 0, got 0",
    ),
    Case(
        "generate-scheduler-negative-step-scale",
        "generate",
        lambda e: [
            "--checkpoint",
            _json_edit(e, SCHEDULER, lambda c: {**c, "step_scale": -1.0}),
            "--output",
            e.out,
        ],
        "scheduler_config.json: step_scale must be > 0",
    ),
    Case(
        "generate-scheduler-steps-not-integer",
        "generate",
        lambda e: [
            "--checkpoint",
            _json_edit(e, SCHEDULER, lambda c: {**c, "n_steps": "15"}),
            "--output",
            e.out,
        ],
        "scheduler_config.json: n_steps must be an integer",
    ),
    Case(
        "generate-nan-weights",
        "generate",
        lambda e: ["--checkpoint", _nan_weights(e), "--output", e.out],
        "ebm/diffusion_pytorch_model.safetensors: tensor",
    ),
    # ---- inpaint
    Case(
        "inpaint-unknown-flag",
        "inpaint",
        lambda e: e.inpaint("--mask_preset", "center", "--num_sample", "2"),
        "(did you mean --num_samples?)",
    ),
    Case(
        "inpaint-not-an-integer",
        "inpaint",
        lambda e: e.inpaint("--mask_preset", "center", "--num_samples", "many"),
        "invalid int value: 'many'",
    ),
    Case(
        "inpaint-zero-samples",
        "inpaint",
        lambda e: e.inpaint("--mask_preset", "center", "--num_samples", "0"),
        "--num_samples must be at least 1",
    ),
    Case(
        "inpaint-negative-resample",
        "inpaint",
        lambda e: e.inpaint("--mask_preset", "center", "--resample", "-1"),
        "--resample must be >= 0",
    ),
    Case(
        "inpaint-negative-batch",
        "inpaint",
        lambda e: e.inpaint("--mask_preset", "center", "--batch_size", "-1"),
        "--batch_size must be at least 1",
    ),
    Case(
        "inpaint-unknown-preset",
        "inpaint",
        lambda e: e.inpaint("--mask_preset", "middle"),
        "invalid choice: 'middle'",
    ),
    Case(
        "inpaint-missing-image",
        "inpaint",
        lambda e: e.inpaint("--mask_preset", "center", image=e.tmp / "nope.png"),
        "does not exist",
    ),
    Case(
        "inpaint-empty-image-folder",
        "inpaint",
        lambda e: e.inpaint("--mask_preset", "center", image=e.folder("empty", notes=True)),
        "holds no PNG or JPEG files",
    ),
    Case(
        "inpaint-corrupt-image",
        "inpaint",
        lambda e: e.inpaint("--mask_preset", "center", image=e.corrupt("bad.png")),
        "cannot read image",
    ),
    Case(
        "inpaint-truncated-image",
        "inpaint",
        lambda e: e.inpaint("--mask_preset", "center", image=e.truncated("cut.png")),
        "cannot read image",
    ),
    Case(
        "inpaint-corrupt-mask",
        "inpaint",
        lambda e: e.inpaint("--mask", e.corrupt("mask.png")),
        "cannot read mask",
    ),
    Case(
        "inpaint-missing-checkpoint",
        "inpaint",
        lambda e: e.inpaint("--mask_preset", "center", checkpoint=e.tmp / "nowhere"),
        "does not exist",
    ),
    Case(
        "inpaint-pickle-weights",
        "inpaint",
        lambda e: e.inpaint("--mask_preset", "center", checkpoint=e.pickle_weights()),
        "which are never loaded",
    ),
    Case(
        "inpaint-output-not-ours",
        "inpaint",
        lambda e: e.inpaint("--mask_preset", "center", output=e.folder("mine", notes=True)),
        "is a folder cdrl did not write",
    ),
    Case(
        "inpaint-output-with-a-users-manifest",
        "inpaint",
        lambda e: e.inpaint(
            "--mask_preset", "center", output=e.folder("photos", notes=True, manifest=True)
        ),
        "is a folder cdrl did not write",
    ),
    Case(
        "inpaint-out-of-memory-huge-batch",
        "inpaint",
        lambda e: e.inpaint(
            "--mask_preset", "center", "--num_samples", "10000000", "--batch_size", "10000000"
        ),
        "out of memory (could not allocate",
        memory_limit=2**29,
    ),
    # ---- inpaint: class A, B, C
    Case(
        "inpaint-10-to-12-samples",
        "inpaint",
        lambda e: e.inpaint("--mask_preset", "center", "--num_samples", T12),
        "--num_samples must be at most 10,000,000",
    ),
    Case(
        "inpaint-huge-resample",
        "inpaint",
        lambda e: e.inpaint("--mask_preset", "center", "--resample", "1000000000"),
        "--resample must be at most 1,000",
    ),
    Case(
        "inpaint-guidance-inf",
        "inpaint",
        lambda e: e.inpaint(
            "--mask_preset",
            "center",
            "--class_label",
            "1",
            "--guidance_scale",
            "inf",
            checkpoint=e.pipeline("cond"),
        ),
        "--guidance_scale must be a finite number",
    ),
    Case(
        "inpaint-device-nonsense",
        "inpaint",
        lambda e: e.inpaint("--mask_preset", "center", "--device", "nonsense"),
        "--device 'nonsense' is not a torch device",
    ),
    Case(
        "inpaint-image-name-too-long",
        "inpaint",
        lambda e: e.inpaint("--mask_preset", "center", image=e.tmp / f"{LONG}.png"),
        "File name too long",
    ),
    Case(
        "inpaint-scheduler-zero-scale",
        "inpaint",
        lambda e: e.inpaint(
            "--mask_preset",
            "center",
            checkpoint=_json_edit(e, SCHEDULER, lambda c: {**c, "data_scale": 0}),
        ),
        "scheduler_config.json: data_scale must be > 0",
    ),
    # ---- cdrl-calibrate
    Case(
        "calibrate-unconditional",
        "calibrate",
        lambda e: ["--checkpoint", e.pipeline("uncond")],
        "is an unconditional model",
    ),
    Case(
        "calibrate-no-training-config",
        "calibrate",
        lambda e: ["--checkpoint", e.pipeline("cond")],
        "training_config.yaml not found",
    ),
    Case(
        "calibrate-missing-checkpoint",
        "calibrate",
        lambda e: ["--checkpoint", e.tmp / "nowhere"],
        "does not exist",
    ),
    Case(
        "calibrate-device-nonsense",
        "calibrate",
        lambda e: ["--checkpoint", e.pipeline("cond"), "--device", "nonsense"],
        "--device 'nonsense' is not a torch device",
    ),
    Case(
        "calibrate-10-to-12-samples",
        "calibrate",
        lambda e: ["--checkpoint", e.pipeline("cond"), "--num_samples", T12],
        "--num_samples must be at most 10,000,000",
    ),
    # ---- evaluate
    Case(
        "evaluate-device-nonsense",
        "evaluate",
        lambda e: [
            "--checkpoint",
            e.pipeline(),
            "--metrics",
            "bpd",
            "--device",
            "nonsense",
            "--output",
            e.tmp / "m.json",
        ],
        "--device 'nonsense' is not a torch device",
    ),
    Case(
        "evaluate-10-to-12-examples",
        "evaluate",
        lambda e: [
            "--checkpoint",
            e.pipeline(),
            "--metrics",
            "bpd",
            "--num_examples",
            T12,
            "--output",
            e.tmp / "m.json",
        ],
        "--num_examples must be at most 10,000,000",
    ),
    Case(
        "evaluate-guidance-nan",
        "evaluate",
        lambda e: [
            "--checkpoint",
            e.pipeline("cond"),
            "--metrics",
            "accuracy",
            "--all_classes",
            "--guidance_scale",
            "nan",
            "--output",
            e.tmp / "m.json",
        ],
        "--guidance_scale must be a finite number",
    ),
    Case(
        "evaluate-convergence-without-bpd",
        "evaluate",
        lambda e: [
            "--checkpoint",
            e.pipeline("cond"),
            "--metrics",
            "accuracy",
            "--all_classes",
            "--bpd_convergence",
            "--output",
            e.tmp / "m.json",
        ],
        "--bpd_convergence is for --metrics bpd",
    ),
    Case(
        "evaluate-convergence-4k-too-many",
        "evaluate",
        lambda e: [
            "--checkpoint",
            e.pipeline(),
            "--metrics",
            "bpd",
            "--heldout",
            "digits-test",
            "--bpd_convergence",
            "--bpd_num_intermediate",
            "30000",
            "--output",
            e.tmp / "m.json",
        ],
        "--bpd_convergence runs 4 x --bpd_num_intermediate = 120,000 annealing steps",
    ),
    Case(
        "evaluate-convergence-one-example",
        "evaluate",
        lambda e: [
            "--checkpoint",
            e.pipeline(),
            "--metrics",
            "bpd",
            "--heldout",
            "digits-test",
            "--bpd_convergence",
            "--num_examples",
            "1",
            "--output",
            e.tmp / "m.json",
        ],
        "--bpd_convergence needs at least 2 examples",
    ),
    Case(
        "evaluate-convergence-given-a-value",
        "evaluate",
        lambda e: [
            "--checkpoint",
            e.pipeline(),
            "--metrics",
            "bpd",
            "--heldout",
            "digits-test",
            "--bpd_convergence",
            "4",
            "--output",
            e.tmp / "m.json",
        ],
        "unrecognized arguments: 4",
    ),
    Case(
        "calibrate-zero-samples",
        "calibrate",
        lambda e: ["--checkpoint", e.pipeline("cond"), "--num_samples", "0"],
        "--num_samples must be >= 1",
    ),
]


def _gen(env: Env, kind: str, *args: str) -> list:
    return ["--checkpoint", env.pipeline(kind), "--output", env.out, *args]


def _json_edit(env: Env, file: str, edit: Callable, kind: str = "uncond") -> Path:
    """A pipeline copy whose JSON ``file`` was replaced by ``edit(its value)``."""
    folder = env.pipeline(kind)
    path = folder / file
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    return folder


def _drop(mapping: dict, key: str) -> dict:
    return {k: v for k, v in mapping.items() if k != key}


def _nan_weights(env: Env) -> Path:
    """A pipeline copy whose EBM weights hold a nan (a diverged run's export)."""
    from safetensors.torch import load_file, save_file

    folder = env.pipeline()
    path = folder / "ebm" / "diffusion_pytorch_model.safetensors"
    weights = load_file(path)
    next(v for v in weights.values() if v.is_floating_point()).view(-1)[0] = float("nan")
    save_file(weights, path)
    return folder


def _write_bytes(env: Env, name: str, data: bytes) -> Path:
    path = env.tmp / name
    path.write_bytes(data)
    return path


def _symlink_loop(env: Env) -> Path:
    """A symlink that points at itself through another (ELOOP on open)."""
    (env.tmp / "loop_a").symlink_to(env.tmp / "loop_b")
    (env.tmp / "loop_b").symlink_to(env.tmp / "loop_a")
    return env.tmp / "loop_a"


def _lone_checkpoint(env: Env) -> Path:
    """checkpoint-2 of the finished run, copied into a folder that is not a run."""
    target = env.folder("loose") / "checkpoint-2"
    shutil.copytree(env.copy("finished_run") / "checkpoint-2", target)
    return target


def _garbage_ema(env: Env) -> Path:
    """checkpoint-2 whose ema.safetensors is garbage of the size checkpoint.json records."""
    checkpoint = env.copy("finished_run") / "checkpoint-2"
    ema = checkpoint / "ema.safetensors"
    ema.write_bytes(b"\x00" * ema.stat().st_size)
    return checkpoint


def _widened_run(env: Env) -> Path:
    """The finished run whose config.yaml now builds a wider EBM than its checkpoints hold."""
    run = env.copy("finished_run")
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("base_channels: 8", "base_channels: 16", 1))
    return run


def _without_marker(env: Env) -> Path:
    run = env.copy("finished_run")
    (run / "checkpoint-2" / "checkpoint.json").unlink()
    return run


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """A finished debug.yaml run (2 steps, checkpoint-2) and two tiny pipelines, made once."""
    from conftest import build_ebm, build_initializer

    from cdrl.cli.train import main
    from cdrl.pipeline import CDRLPipeline, CDRLScheduler

    root = tmp_path_factory.mktemp("bad_input_sources")
    found = {"finished_run": root / "finished_run"}
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    argv = ["--config", str(DEBUG), "--output_dir", str(found["finished_run"]), "--report_to"]
    argv += ["none", "--max_train_steps", "2", "--set", "log.sample_every=0"]
    assert main(argv) == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    for kind, sizes in (("uncond", ()), ("cond", (10,))):
        pipe = CDRLPipeline(
            ebm=build_ebm(condition_sizes=sizes),
            initializer=build_initializer(condition_sizes=sizes),
            scheduler=CDRLScheduler(n_steps=1),
        )
        found[kind] = root / kind
        pipe.save_pretrained(found[kind])
    return found


def _snapshot(folder: Path) -> dict[str, tuple[int, int] | None]:
    """Every entry under ``folder``: (size, mtime) of files, None for folders."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        if p.is_file()
        else None
        for p in sorted(folder.rglob("*"))
    }


def test_case_ids_are_unique():
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", [case.param() for case in CASES])
def test_bad_input(case: Case, sources, tmp_path, tmp_path_factory, capsys, request):
    env = Env(tmp_path / "case", sources)
    env.tmp.mkdir()
    argv = [str(a) for a in case.args(env)]
    before = _snapshot(env.tmp)
    if case.memory_limit is None:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        try:
            code = importlib.import_module(SCRIPTS[case.script]).main(argv)
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
        captured = capsys.readouterr()
        out, err = captured.out, captured.err
    else:
        runner = request.getfixturevalue("fresh_process")
        io = tmp_path_factory.mktemp("io")  # outside the snapshotted folder
        code, out, err = runner.run(SCRIPTS[case.script], argv, io, memory_margin=case.memory_limit)
    lines = err.strip().splitlines()
    assert code == 2, err[-3000:]
    assert len(err) <= len("error: \n") + 300, f"an error line of {len(err)} characters"
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    assert case.says in lines[0], lines[0]
    assert out == ""
    assert _snapshot(env.tmp) == before, "the failed command wrote or changed files"
    assert not (env.tmp / "executed").exists(), "a pickle was unpickled"
    print(
        f"{case.script}: {' '.join(argv)}\n  -> {lines[0]}"
    )  # the table of the issue note: pytest -rP
