"""Config: command-line override parsing, YAML + overrides, unknown keys and types rejected."""
from dataclasses import dataclass
from typing import Literal, Optional

import pytest

from toolkit.config import ConfigError, config_from_argv, load_config, parse_overrides


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
