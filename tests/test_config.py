"""Tests of cdrl.config: YAML deltas, ``key=value`` overrides, coercion, validation, round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdrl.config import Config, ConfigError, flat, load_config, save_config, to_dict, validate

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_paper_settings():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.schedule.num_levels == 6 and cfg.langevin.n_steps == 15
    assert cfg.langevin.b2 == 4e-4 and cfg.langevin.tweedie_b2 == 2e-4
    assert cfg.train.ebm_lr == 1e-4 and cfg.train.init_lr == 1e-5
    assert cfg.train.variance_reduction and cfg.data.uncond_prob == 0.1


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    cfg = load_config(path)
    validate(cfg)
    assert isinstance(cfg, Config)


def test_shipped_configs_exist():
    assert any(p.name == "digits.yaml" for p in CONFIGS)


# ------------------------------------------------------------------ unknown keys


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("train: {batchsize: 4}\n", "train.batchsize"),
        ("trian: {batch_size: 4}\n", "trian"),
        ("ebm: {arch: resnet, widht: 3}\n", "ebm.widht"),
    ],
)
def test_unknown_yaml_key_is_named(tmp_path, text, key):
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'"):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize("item", ["train.batchsize=4", "trian.batch_size=4", "bogus=1"])
def test_unknown_override_key_is_named(item):
    key = item.split("=")[0]
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(overrides=[item])


@pytest.mark.parametrize(
    ("item", "suggestion"),
    [
        ("train.batchsize=4", "train.batch_size"),
        ("trian.batch_size=4", "train.batch_size"),
        ("gaurd.lr_factor=0.5", "guard.lr_factor"),
        ("langevin.nsteps=3", "langevin.n_steps"),
    ],
)
def test_mistyped_key_gets_a_suggestion(item, suggestion):
    with pytest.raises(ConfigError, match=f"did you mean '{suggestion}'"):
        load_config(overrides=[item])


def test_no_suggestion_for_a_key_unlike_any():
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["train.zzzzzz=1"])
    assert "did you mean" not in str(info.value)


def test_guard_defaults_are_on_and_the_gap_bound_can_be_turned_off():
    guard = load_config().guard
    assert guard.enabled and guard.max_bad_steps >= 1 and 0 < guard.lr_factor < 1
    assert load_config(overrides=["guard.max_energy_gap=.inf"]).guard.max_energy_gap == float("inf")


def test_override_below_a_leaf_is_a_config_error():
    with pytest.raises(ConfigError, match="train.batch_size.x"):
        load_config(overrides=["train.batch_size.x=1"])


def test_section_needs_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="'train' is a section"):
        load_config(write(tmp_path, "train: 3\n"))
    with pytest.raises(ConfigError, match="'train' is a section"):
        load_config(overrides=["train=3"])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: {batch_size: [\n"))
    assert load_config(write(tmp_path, "")) == Config()  # an empty file is no delta


# ------------------------------------------------------------------ coercion


def test_yaml_scientific_notation_becomes_float(tmp_path):
    # PyYAML reads 1e-5 (no dot) as the string '1e-5'
    cfg = load_config(
        write(tmp_path, "train: {ebm_lr: 1e-5, init_lr: 3E-4}\nlangevin: {b2: 2e-4}\n")
    )
    assert cfg.train.ebm_lr == 1e-5 and isinstance(cfg.train.ebm_lr, float)
    assert cfg.train.init_lr == 3e-4
    assert cfg.langevin.b2 == 2e-4
    assert load_config(overrides=["train.ebm_lr=1e-5"]).train.ebm_lr == 1e-5


@pytest.mark.parametrize(
    ("item", "attr", "expected"),
    [
        ("train.batch_size=64", ("train", "batch_size"), 64),
        ("train.batch_size=64.0", ("train", "batch_size"), 64),
        ("train.max_steps=1e3", ("train", "max_steps"), 1000),
        ("train.batch_size='16'", ("train", "batch_size"), 16),
        ("langevin.step_scale=2", ("langevin", "step_scale"), 2.0),
        ("langevin.noise=false", ("langevin", "noise"), False),
        ("langevin.noise='False'", ("langevin", "noise"), False),
        ("langevin.tweedie='yes'", ("langevin", "tweedie"), True),
        ("schedule.kind=drl", ("schedule", "kind"), "drl"),
        ("log.report_to=none", ("log", "report_to"), "none"),
        ("log.checkpoints_total_limit=", ("log", "checkpoints_total_limit"), None),
        ("log.checkpoints_total_limit=null", ("log", "checkpoints_total_limit"), None),
        ("data.image_size=32", ("data", "image_size"), 32),
        ("ebm.channel_mult=[1, 2]", ("ebm", "channel_mult"), [1, 2]),
        ("ebm.channel_mult=1,2,4", ("ebm", "channel_mult"), [1, 2, 4]),
        (
            "initializer.attention_levels=[false, true, no]",
            ("initializer", "attention_levels"),
            [False, True, False],
        ),
        ("data.attributes=male,smiling", ("data", "attributes"), ["male", "smiling"]),
    ],
)
def test_override_coercion(item, attr, expected):
    cfg = load_config(overrides=[item])
    value = getattr(getattr(cfg, attr[0]), attr[1])
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(("value", "expected"), [("1", True), ("0", False)])
def test_bool_from_one_and_zero(value, expected):
    assert load_config(overrides=[f"data.random_flip={value}"]).data.random_flip is expected


def test_overrides_apply_after_the_file_in_order(tmp_path):
    path = write(tmp_path, "train: {batch_size: 8, max_steps: 100}\n")
    cfg = load_config(path, ["train.batch_size=16", "train.batch_size=24", "langevin.n_steps=3"])
    assert cfg.train.batch_size == 24
    assert cfg.train.max_steps == 100
    assert cfg.langevin.n_steps == 3


@pytest.mark.parametrize(
    ("item", "key", "words"),
    [
        ("train.batch_size=abc", "train.batch_size", "integer"),
        ("train.batch_size=2.5", "train.batch_size", "integer"),
        ("train.batch_size=true", "train.batch_size", "integer"),
        ("train.batch_size=[1]", "train.batch_size", "integer"),
        ("train.batch_size=", "train.batch_size", "integer"),
        ("train.ebm_lr=fast", "train.ebm_lr", "number"),
        ("train.ebm_lr=true", "train.ebm_lr", "number"),
        ("langevin.noise=maybe", "langevin.noise", "true or false"),
        ("langevin.noise=2", "langevin.noise", "true or false"),
        ("schedule.kind=ddpm", "schedule.kind", "one of"),
        ("ebm.channel_mult=3", "ebm.channel_mult", "list"),
        ("ebm.channel_mult=[1, x]", "ebm.channel_mult", "integer"),
        ("log.output_dir=[a]", "log.output_dir", "string"),
        ("data.image_size=big", "data.image_size", "integer"),
    ],
)
def test_bad_types_name_the_key(item, key, words):
    with pytest.raises(ConfigError, match=rf"'{key}' must be .*{words}|'{key}' must be {words}"):
        load_config(overrides=[item])


@pytest.mark.parametrize("value", [".inf", "nan"])
def test_non_finite_integer_is_a_config_error(value):
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config(overrides=[f"train.batch_size={value}"])


def test_bad_types_in_yaml_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="'train.batch_size' must be an integer"):
        load_config(write(tmp_path, "train: {batch_size: {a: 1}}\n"))
    with pytest.raises(ConfigError, match="'data.download' must be true or false"):
        load_config(write(tmp_path, "data: {download: sometimes}\n"))


def test_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(overrides=["train.batch_size"])
    cfg = load_config(overrides=[" train.batch_size =  12"])
    assert cfg.train.batch_size == 12


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("langevin.n_steps=-1", "langevin.n_steps"),
        ("train.batch_size=0", "train.batch_size"),
        ("schedule.num_levels=0", "schedule.num_levels"),
        ("train.max_steps=0", "train.max_steps"),
        ("langevin.b2=0", "langevin.b2"),
        ("langevin.step_scale=-1", "langevin.step_scale"),
        ("langevin.clip_sample_range=0", "langevin.clip_sample_range"),
        ("langevin.refine_top=7", "langevin.refine_top"),  # the default schedule has 6 levels
        ("langevin.refine_top=-1", "langevin.refine_top"),
        ("train.refine_top=7", "train.refine_top"),
        ("train.refine_top=2", "langevin.refine_top"),  # sampling would refine untrained levels
        ("train.ebm_lr=0", "train.ebm_lr"),
        ("train.ema_decay=1.0", "train.ema_decay"),
        ("data.uncond_prob=1.5", "data.uncond_prob"),
        ("schedule.logsnr_max=-6", "schedule.logsnr_max"),
        ("log.checkpoints_total_limit=0", "log.checkpoints_total_limit"),
        ("initializer.attention_levels=[true]", "initializer.attention_levels"),
        ("data.num_workers=-1", "data.num_workers"),
        ("train.adam_beta1=1", "train.adam_beta1"),
        ("train.init_weight_decay=-0.1", "train.init_weight_decay"),
        ("ebm.base_channels=0", "ebm.base_channels"),
        ("ebm.channel_mult=[]", "ebm.channel_mult"),
        ("initializer.block_out_channels=[0]", "initializer.block_out_channels"),
        ("initializer.dropout=1", "initializer.dropout"),
        ("guard.max_energy_gap=0", "guard.max_energy_gap"),
        ("guard.max_bad_steps=0", "guard.max_bad_steps"),
        ("guard.lr_factor=1", "guard.lr_factor"),
        ("guard.lr_factor=0", "guard.lr_factor"),
        ("guard.max_rollbacks=-1", "guard.max_rollbacks"),
        ("train.ebm_lr=nan", "train.ebm_lr"),
    ],
)
def test_validate_rejects(item, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[item])


def test_validate_rejects_drl_with_one_level():
    with pytest.raises(ConfigError, match="schedule.kind=drl"):
        load_config(overrides=["schedule.kind=drl", "schedule.num_levels=1"])
    assert load_config(overrides=["schedule.num_levels=1"]).schedule.num_levels == 1
    assert load_config(overrides=["langevin.n_steps=0"]).langevin.n_steps == 0


# ------------------------------------------------------------------ round trip


def test_save_load_round_trip(tmp_path):
    cfg = load_config(
        overrides=[
            "train.batch_size=7",
            "train.ebm_lr=3e-5",
            "schedule.kind=drl",
            "ebm.channel_mult=[1, 2]",
            "initializer.block_out_channels=[8, 16]",
            "initializer.attention_levels=[false, true]",
            "data.data_dir=/tmp/x",
            "log.checkpoints_total_limit=null",
            "data.attributes=[male]",
        ]
    )
    path = tmp_path / "saved.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved.yaml"]  # written atomically
    assert to_dict(load_config(path)) == to_dict(cfg)


def test_flat_is_scalar_only():
    out = flat(Config())
    assert out["train.batch_size"] == 32
    assert out["ebm.channel_mult"] == "[1, 2, 2, 2]"
    assert all(isinstance(v, int | float | str | bool) for v in out.values() if v is not None)


def test_train_refine_top_needs_a_sampler_that_stays_on_trained_levels():
    top2 = ["train.refine_top=2", "langevin.refine_top=2"]
    with pytest.raises(ConfigError, match="langevin.tweedie false"):
        load_config(overrides=top2)
    cfg = load_config(overrides=[*top2, "langevin.tweedie=false"])
    assert (cfg.train.refine_top, cfg.langevin.refine_top) == (2, 2)
    with pytest.raises(ConfigError, match="langevin.refine_top to at most"):
        load_config(overrides=[*top2, "langevin.tweedie=false", "langevin.refine_top=3"])
    levels = load_config().schedule.num_levels  # every level: the level-0 EBM is trained
    assert load_config(overrides=[f"train.refine_top={levels}", "langevin.refine_top=1"])
