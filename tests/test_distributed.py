"""Multi-process launches of train.py on the CPU (gloo): torchrun with 2 processes, accelerate launch.

Each test starts fresh Python processes (imports alone take seconds), so they are marked slow; each
stays well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs/debug.yaml"
TIMEOUT = 300

pytestmark = pytest.mark.slow

# Runs cdrl.cli.train.main(argv) unchanged, spying on train_step (to keep the prepared models and the
# accelerator) and on the levels t it draws; afterwards every rank writes its live weights, its
# first levels and batches, and its data sampler's epoch-0 order.
DRIVER = textwrap.dedent(
    """
    import json
    import sys
    from pathlib import Path

    from accelerate.data_loader import get_sampler
    from safetensors.torch import save_file

    import cdrl.cli.train as T
    import cdrl.training.loop as loop
    import cdrl.training.step as step

    out, argv = Path(sys.argv[1]), sys.argv[2:]
    seen = {"levels": [], "batches": []}
    train_step, level = loop.train_step, step.level

    def spy_level(schedule, t, settings):
        if seen.pop("first", False):  # the batch's levels (later calls: persistent chains)
            seen["levels"].append(t.tolist())
        return level(schedule, t, settings)

    def spy_step(models, batch, cfg, schedule, accelerator, condition_sizes=()):
        seen["models"], seen["accelerator"], seen["first"] = models, accelerator, True
        seen["batches"].append(batch[0].flatten(1).sum(1).tolist())
        return train_step(models, batch, cfg, schedule, accelerator, condition_sizes)

    loop.train_step, step.level = spy_step, spy_level
    code = T.main(argv)
    accelerator, models = seen["accelerator"], seen["models"]
    rank = accelerator.process_index
    tensors = {}
    for name, module in (("ebm", models.ebm), ("init", models.initializer)):
        state = accelerator.unwrap_model(module).state_dict()
        tensors.update({f"{name}.{k}": v.detach().cpu().contiguous() for k, v in state.items()})
    save_file(tensors, str(out / f"rank{rank}.safetensors"))
    sampler = get_sampler(accelerator._dataloaders[0])
    sampler.set_epoch(0)
    info = {
        "rank": rank,
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "levels": seen["levels"],
        "batches": seen["batches"],
        "sampler_seed": int(sampler.initial_seed),
        "epoch0_order": list(sampler)[:64],
    }
    (out / f"rank{rank}.json").write_text(json.dumps(info))
    sys.exit(code)
    """
)


def _env(**extra: str) -> dict[str, str]:
    """The test's environment for a launcher: one OpenMP thread per process, no inherited CPU flag."""
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    path = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=path, **extra)
    return env


def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def _steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def _torchrun(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        *args,
    ]


# Persistent chains at level 0, every level-0 negative from a chain that never restarts: the chains are
# per-rank state a resume must restore.
TRAIN_ARGS = [
    "--config",
    str(DEBUG),
    "--report_to",
    "none",
    "--set",
    "train.max_steps=3",
    "train.persistent_levels=1",
    "train.persistent_size=4",
    "train.persistent_fraction=1.0",
    "train.persistent_reset=0.0",
]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """train.py's main() under torchrun with 2 CPU processes (gloo), 3 steps."""
    tmp = tmp_path_factory.mktemp("torchrun")
    driver = tmp / "driver.py"
    driver.write_text(DRIVER)
    run_dir = tmp / "run"
    cmd = _torchrun(str(driver), str(tmp), *TRAIN_ARGS, "--output_dir", str(run_dir))
    # accelerate uses gloo on the CPU only when told to (accelerate launch --cpu sets this)
    proc = _run(cmd, _env(ACCELERATE_USE_CPU="true"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    infos = [json.loads((tmp / f"rank{r}.json").read_text()) for r in (0, 1)]
    weights = [load_file(str(tmp / f"rank{r}.safetensors")) for r in (0, 1)]
    return run_dir, infos, weights


def test_torchrun_two_cpu_processes_train_and_export(two_ranks):
    run_dir, infos, _ = two_ranks
    assert [info["num_processes"] for info in infos] == [2, 2]
    assert all(info["distributed_type"].endswith("MULTI_CPU") for info in infos)
    assert _steps(run_dir) == [1, 2, 3]  # written by the main process only, once per step
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # warmup counts optimizer steps whatever the number of processes: step 1 of 2 -> half the lr
    assert metrics[0]["lr/ebm"] == pytest.approx(0.5 * 1e-4)
    checkpoints = sorted(p.name for p in run_dir.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-2", "checkpoint-3"]
    listed = json.loads((run_dir / "checkpoint-3" / "checkpoint.json").read_text())["files"]
    for rank in (0, 1):  # save_state stores every process's RNG state; each keeps its own chains
        assert (run_dir / "checkpoint-3" / f"random_states_{rank}.pkl").is_file()
        assert f"persistent_chains_{rank}.safetensors" in listed
    assert (run_dir / "pipeline" / "model_index.json").is_file()
    assert not list(run_dir.glob(".tmp-*"))


def test_torchrun_resume_restores_each_ranks_persistent_chains(two_ranks, tmp_path):
    """0 -> 2, then resumed 2 -> 3, with two processes: step 3 repeats the one-go run's step 3 only if
    each rank gets back its own chains (and RNG state) from checkpoint-2."""
    run_dir, _, _ = two_ranks
    split = tmp_path / "split"
    env = _env(ACCELERATE_USE_CPU="true")
    for extra in (["--max_train_steps", "2"], ["--resume_from_checkpoint", "latest"]):
        cmd = _torchrun(str(ROOT / "train.py"), *TRAIN_ARGS, "--output_dir", str(split), *extra)
        proc = _run(cmd, env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _steps(split) == [1, 2, 3]
    one_go, resumed = (
        [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        for d in (run_dir, split)
    )
    assert resumed[2]["persistent/share"] > 0  # continued chains fed the EBM at step 3
    for key in ("ebm/loss", "ebm/energy_gap", "init/mse", "persistent/share"):
        assert resumed[2][key] == pytest.approx(one_go[2][key], rel=1e-5, abs=1e-7), key


def test_torchrun_ranks_keep_identical_weights(two_ranks):
    run_dir, _, (rank0, rank1) = two_ranks
    assert rank0.keys() == rank1.keys()
    assert any(k.startswith("ebm.") for k in rank0) and any(k.startswith("init.") for k in rank0)
    # bit-exact: DDP gives both ranks the same all-reduced gradients, so the same updates
    different = [k for k in rank0 if not torch.equal(rank0[k], rank1[k])]
    assert not different, different  # parameters and spectral-norm u/v buffers alike
    # The final checkpoint (written by the main process) holds exactly these weights, and step 3
    # changed them (checkpoint-2 differs).
    for prefix, file in (("ebm.", "model.safetensors"), ("init.", "model_1.safetensors")):
        live = {k[len(prefix) :]: v for k, v in rank0.items() if k.startswith(prefix)}
        final = load_file(str(run_dir / "checkpoint-3" / file))
        assert final.keys() == live.keys()
        assert all(torch.equal(final[k], live[k]) for k in live), prefix  # saved bits, read back
        earlier = load_file(str(run_dir / "checkpoint-2" / file))
        assert any(not torch.equal(earlier[k], live[k]) for k in live), prefix


def test_torchrun_ranks_draw_different_noise_and_data(two_ranks):
    _, (info0, info1), _ = two_ranks
    assert len(info0["levels"]) == len(info1["levels"]) == 3
    assert info0["levels"][0] != info1["levels"][0]  # set_seed(..., device_specific=True)
    assert info0["batches"][0] != info1["batches"][0]  # each rank gets its own shard


def test_torchrun_ranks_shard_one_shared_data_order(two_ranks):
    _, (info0, info1), _ = two_ranks
    assert info0["sampler_seed"] == info1["sampler_seed"]
    assert info0["epoch0_order"] == info1["epoch0_order"]


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="plain torchrun uses the GPUs when there are any"
)
def test_plain_torchrun_on_cpu_is_refused(tmp_path: Path):
    """Without ACCELERATE_USE_CPU, accelerate (the pinned 1.x) finds no accelerator backend for
    torchrun's LOCAL_RANK and runs each CPU process alone (DistributedType.NO): two unsynchronized
    copies of one run. main() refuses that on every rank, before training, with one line that says
    how to launch on CPU."""
    run_dir = tmp_path / "run"
    cmd = _torchrun(str(ROOT / "train.py"), *TRAIN_ARGS, "--set", "log.sample_every=0")
    proc = _run([*cmd, "--output_dir", str(run_dir)], _env())
    assert proc.returncode != 0, proc.stdout[-3000:]
    expected = (
        "error: launched as 2 processes, but accelerate sees 1; on CPU use `accelerate launch "
        "--cpu ...` or set ACCELERATE_USE_CPU=1 for torchrun"
    )
    # One line from each rank. The two ranks write to one stderr at the same moment, so their lines may
    # run together: count the message rather than split lines.
    assert proc.stderr.count(expected) == 2, proc.stderr[-3000:]
    assert proc.stderr.count("error:") == 2, proc.stderr[-3000:]
    assert not (run_dir / "metrics.jsonl").exists()  # refused before any step
    assert not list(run_dir.glob("checkpoint-*")) and not (run_dir / "pipeline").exists()


def test_accelerate_launch_cpu_single_process(tmp_path: Path):
    from accelerate.utils import write_basic_config

    config_file = tmp_path / "accel.json"
    write_basic_config(mixed_precision="no", save_location=str(config_file))
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file)]
    cmd += ["--cpu", "--num_processes", "1", "train.py", *TRAIN_ARGS, "--output_dir", str(run_dir)]
    proc = _run(cmd, _env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"done: pipeline saved to {run_dir / 'pipeline'}" in proc.stdout
    assert _steps(run_dir) == [1, 2, 3]
    assert (run_dir / "pipeline" / "model_index.json").is_file()
    assert (run_dir / "pipeline" / "training_config.yaml").is_file()
