"""Config loading: layers merge in order and every mistake is one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field

from lmforge.config import (
    HASHED_IF_SET,
    Section,
    StageConfig,
    config_hash,
    describe_fields,
    load_config,
)
from lmforge.errors import ConfigError


class Train(Section):
    lr: float = Field(3e-4, gt=0, description="peak learning rate")
    max_steps: int = Field(100, ge=1, description="optimizer steps")
    schedule: str = Field("cosine", pattern="^(cosine|linear)$", description="lr schedule")


class Toy(StageConfig):
    data: Path = Field(description="input data directory")
    train: Train = Train()


def test_layers_merge_file_then_values_then_overrides(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text("data: a\ntrain:\n  lr: 0.1\n  max_steps: 5\nout: o\n")
    cfg = load_config(Toy, file=file, values={"data": "b"}, overrides=["train.max_steps=7"])
    assert cfg.data == Path("b")
    assert cfg.train.lr == 0.1
    assert cfg.train.max_steps == 7
    assert cfg.out == Path("o")


def test_override_values_are_typed_yaml() -> None:
    cfg = load_config(Toy, values={"data": "d", "out": "o"}, overrides=["train.lr=1e-3"])
    assert cfg.train.lr == pytest.approx(1e-3)


def test_unknown_key_names_key_and_allowed_keys() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(Toy, values={"data": "d", "out": "o"}, overrides=["train.lrr=1"])
    msg = str(err.value)
    assert "unknown key 'train.lrr'" in msg
    assert "lr, max_steps, schedule" in msg
    assert "\n" not in msg


def test_bad_value_names_key_value_and_rule() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(Toy, values={"data": "d", "out": "o"}, overrides=["train.max_steps=0"])
    msg = str(err.value)
    assert "'train.max_steps'" in msg and "0" in msg and "greater than or equal to 1" in msg


def test_missing_key_names_its_description() -> None:
    with pytest.raises(ConfigError, match="missing required key 'data' \\(input data directory\\)"):
        load_config(Toy, values={"out": "o"})


def test_malformed_override_and_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"expected dotted\.key=value"):
        load_config(Toy, values={"data": "d", "out": "o"}, overrides=["train.lr"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml line \d+: not valid YAML"):
        load_config(Toy, file=bad)


def test_hash_ignores_out_but_not_values() -> None:
    a = load_config(Toy, values={"data": "d", "out": "o1"})
    b = load_config(Toy, values={"data": "d", "out": "o2"})
    c = load_config(Toy, values={"data": "d", "out": "o1"}, overrides=["train.lr=0.5"])
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(c)


class TrainLater(Train):
    warmup: int = Field(0, description="added later", json_schema_extra=HASHED_IF_SET)


class ToyLater(Toy):
    """Toy after two releases: settings added with defaults that reproduce the old output."""

    train: TrainLater = TrainLater()
    tags: list[str] = Field(
        default_factory=list, description="added later", json_schema_extra=HASHED_IF_SET
    )


def test_fields_hashed_if_set_keep_old_hashes_at_their_defaults() -> None:
    values = {"data": "d", "out": "o"}
    old = config_hash(load_config(Toy, values=values))
    assert config_hash(load_config(ToyLater, values=values)) == old
    explicit = ["train.warmup=0", "tags=[]"]  # set, but to the defaults: the same output
    assert config_hash(load_config(ToyLater, values=values, overrides=explicit)) == old
    for changed in ("train.warmup=5", "tags=[a]"):
        assert config_hash(load_config(ToyLater, values=values, overrides=[changed])) != old


def test_describe_fields_lists_dotted_keys_with_docs() -> None:
    rows = {key: (default, doc) for key, default, doc in describe_fields(Toy)}
    assert rows["train.lr"] == ("0.0003", "peak learning rate")
    assert rows["data"][1] == "input data directory"
