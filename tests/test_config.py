"""Config: command-line override parsing, YAML + overrides, unknown keys and types rejected."""
from dataclasses import dataclass
from typing import Literal, Optional

import pytest
import yaml

from toolkit.config import config_from_argv, load_config, parse_overrides
from toolkit.errors import ConfigError


@dataclass
class Cfg:
    lr: float = 0.1
    epochs: int = 3
    name: str = "run"
    resume: bool = False
    tag: Optional[str] = None
    mode: Literal["pk", "random"] = "pk"

    def validate(self):
        if self.epochs < 0:
            raise ConfigError(f"epochs must be >= 0, got {self.epochs}")


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["lr=0.5"], {"lr": "0.5"}),
        (["--lr=0.5"], {"lr": "0.5"}),
        (["--lr", "0.5"], {"lr": "0.5"}),
        (["--resume"], {"resume": True}),
        (["--resume", "--lr", "2"], {"resume": True, "lr": "2"}),
        (["--resume", "epochs=4"], {"resume": True, "epochs": "4"}),
        (["--lr", "0.5", "--resume"], {"lr": "0.5", "resume": True}),
        (["name=a=b"], {"name": "a=b"}),
        (["--weight-decay=0.1"], {"weight_decay": "0.1"}),
        ([], {}),
    ],
)
def test_parse_overrides_forms(argv, expected):
    path, over = parse_overrides(argv)
    assert path is None
    assert over == expected


@pytest.mark.parametrize(
    "argv",
    [["--config", "c.yaml", "lr=1"], ["--config=c.yaml", "lr=1"], ["lr=1", "config=c.yaml"]],
)
def test_parse_overrides_config_path(argv):
    path, over = parse_overrides(argv)
    assert path == "c.yaml"
    assert over == {"lr": "1"}


def test_parse_overrides_rejects_bare_words():
    with pytest.raises(ConfigError, match="stray"):
        parse_overrides(["lr=1", "stray"])


def test_defaults_yaml_then_overrides(tmp_path):
    assert load_config(Cfg) == Cfg()
    p = tmp_path / "c.yaml"
    p.write_text("lr: 1e-3\nepochs: 7\nname: from-yaml\n")
    cfg = load_config(Cfg, p, {"epochs": "9"})
    assert cfg.lr == pytest.approx(1e-3) and isinstance(cfg.lr, float)  # YAML reads 1e-3 as a str
    assert cfg.epochs == 9 and isinstance(cfg.epochs, int)
    assert cfg.name == "from-yaml"


def test_coercion_of_command_line_strings():
    cfg = load_config(Cfg, None, {"lr": "1e-3", "epochs": "12", "resume": "true", "tag": "none", "mode": "random"})
    assert cfg == Cfg(lr=1e-3, epochs=12, resume=True, tag=None, mode="random")
    assert type(cfg.lr) is float and type(cfg.epochs) is int
    assert load_config(Cfg, None, {"resume": True, "tag": "x"}).tag == "x"
    assert load_config(Cfg, None, {"resume": "0"}).resume is False


def test_config_from_argv_end_to_end(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("epochs: 2\n")
    cfg = config_from_argv(Cfg, ["--config", str(p), "--lr", "1e-3", "--resume", "name=x"])
    assert cfg == Cfg(lr=1e-3, epochs=2, resume=True, name="x")


def test_unknown_key_rejected_with_suggestion(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'epoch'.*did you mean 'epochs'"):
        load_config(Cfg, None, {"epoch": "3"})
    p = tmp_path / "c.yaml"
    p.write_text("lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"'lrr'.*'lr'"):
        load_config(Cfg, p)


@pytest.mark.parametrize(
    "key, value",
    [
        ("epochs", "three"),
        ("epochs", "2.5"),
        ("epochs", 2.5),
        ("epochs", True),
        ("lr", "fast"),
        ("lr", True),
        ("resume", "maybe"),
        ("mode", "balanced"),
        ("epochs", [1, 2]),
    ],
)
def test_wrong_types_rejected_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=key) as e:
        load_config(Cfg, None, {key: value})
    assert "\n" not in str(e.value)


def test_int_field_does_not_silently_truncate_exponent_notation():
    # "1e3" is a whole number -> fine; "1e-3" or "2.5e0" are not integers and must be refused.
    assert load_config(Cfg, None, {"epochs": "1e3"}).epochs == 1000
    with pytest.raises(ConfigError, match="epochs"):
        load_config(Cfg, None, {"epochs": "2.5e0"})


def test_validate_runs_and_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="epochs must be >= 0"):
        load_config(Cfg, None, {"epochs": "-1"})
    with pytest.raises(ConfigError, match="not found"):
        load_config(Cfg, tmp_path / "missing.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Cfg, p)


# --------------------------------------------------------------------------- real ranges

from toolkit.config import MAX_COLLECTIVE_TIMEOUT_S, MAX_SEED, ClassifyConfig, EmbedConfig  # noqa: E402


def _numeric_fields(cls) -> dict:
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if hints[f.name] in (int, float)}


@pytest.mark.parametrize("cls", [EmbedConfig, ClassifyConfig], ids=lambda c: c.__name__)
def test_every_numeric_field_has_a_range_and_its_edges_are_refused(cls):
    fields = _numeric_fields(cls)
    assert set(fields) == set(cls.RANGES), "every int/float config field needs an entry in RANGES"
    for name, (low, high, open_low) in cls.RANGES.items():
        step = 1 if fields[name] is int else 1e-6
        below = low if open_low else low - step
        with pytest.raises(ConfigError, match=rf"^{name} must be") as err:
            load_config(cls, None, {name: below})
        assert "\n" not in str(err.value)
        if high is not None:
            with pytest.raises(ConfigError, match=rf"^{name} must be <= "):
                load_config(cls, None, {name: high + step})
        for bad in ("inf", "-inf", "nan"):
            with pytest.raises(ConfigError, match=name):
                load_config(cls, None, {name: bad})


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("seed", -1, "seed must be >= 0"),
        ("seed", 2**32, "seed must be <= 4294967295"),
        ("lr", "inf", "lr: expected a finite float"),
        ("weight_decay", "inf", "weight_decay: expected a finite float"),
        ("eval_batch_size", 0, "eval_batch_size must be >= 1"),
        ("shuffle_buffer", -1, "shuffle_buffer must be >= 1"),
        ("collective_timeout_s", 1e10, "collective_timeout_s must be <= 604800"),
        ("run_dir", "", "run_dir must not be empty"),
        ("shards", "  ", "shards must not be empty"),
        ("shards", ["a", "b"], "shards: expected str"),
    ],
)
def test_values_that_used_to_crash_later_are_refused_up_front(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(EmbedConfig, None, {key: value})


def test_a_config_file_never_supplies_a_pipe_or_url_shard_location(tmp_path):
    cfg = tmp_path / "run.yaml"
    marker = tmp_path / "pwned"
    for location in (f"pipe:touch {marker}", f"pipe:cat {tmp_path}/{{}}", "https://example.invalid/shards"):
        cfg.write_text(yaml.safe_dump({"shards": location}))
        with pytest.raises(ConfigError, match="never from a file") as err:
            load_config(EmbedConfig, cfg)
        assert str(cfg) in str(err.value)
        # the same location typed on the command line is the user's own choice
        assert load_config(EmbedConfig, cfg, {"shards": location}).shards == location
        cfg.write_text(yaml.safe_dump({"embedder": location}))
        with pytest.raises(ConfigError, match="never from a file"):
            load_config(ClassifyConfig, cfg)
    assert not marker.exists()


def test_range_edges_that_pass_validation_run(tmp_path):
    """The extreme values validation lets through must work in a real run, not crash later."""
    from classify_helpers import make_separable_folder, run_launch, shard

    shards = shard(make_separable_folder(tmp_path / "img", per_class=8), tmp_path / "shards")
    rc, out = run_launch("embed", [
        f"shards={shards}", f"run_dir={tmp_path / 'run'}", "input_size=16", "batch_size=8", "K=2", "max_steps=2",
        "epochs=0", "num_workers=0", "tracker=none", "progress=false", f"seed={MAX_SEED}", "shuffle_buffer=1",
        "eval_batch_size=1", "keep_last=1", "log_every=1", "ckpt_every=1", f"collective_timeout_s={MAX_COLLECTIVE_TIMEOUT_S}",
        "embedding_dim=2",
    ])
    assert rc == 0, out
    assert "best kNN val accuracy" in out


def test_compile_and_channels_last_are_opt_in_flags():
    from toolkit.config import EmbedConfig

    cfg = load_config(EmbedConfig)
    assert cfg.compile is False and cfg.channels_last is False
    cfg = config_from_argv(EmbedConfig, ["compile=true", "--channels_last"])
    assert cfg.compile is True and cfg.channels_last is True
    assert config_from_argv(EmbedConfig, ["--compile", "false"]).compile is False
    with pytest.raises(ConfigError, match="compile"):
        config_from_argv(EmbedConfig, ["compile=maybe"])
