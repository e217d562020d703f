"""The typed config loader: YAML, dotted overrides, precedence, errors that name the key, field docs."""

from __future__ import annotations

import pytest

from chatforge.config import (
    ConfigError,
    RewardConfig,
    SFTConfig,
    describe,
    field_docs,
    format_help,
    load_config,
    save_yaml,
)

MODEL = "model.name_or_path=fixtures/llama"  # SFTConfig.validate requires a model


def _load(*overrides: str, path=None, base=None) -> SFTConfig:
    return load_config(SFTConfig, path, [MODEL, *overrides], base=base)


def _write(tmp_path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_yaml_file_sets_nested_fields_and_keeps_other_defaults(tmp_path):
    path = _write(
        tmp_path,
        "model:\n  name_or_path: my/model\n"
        "engine:\n  zero_stage: 2\n  lora:\n    r: 8\n    target_modules: [q_proj, v_proj]\n"
        "optim:\n  learning_rate: 3e-4\n"  # PyYAML reads 3e-4 (no dot) as a string; the loader converts
        "data:\n  data_split: [1, 0, 0]\n",
    )
    cfg = load_config(SFTConfig, path)
    assert cfg.model.name_or_path == "my/model"
    assert cfg.engine.zero_stage == 2
    assert cfg.engine.lora.r == 8 and cfg.engine.lora.enabled
    assert cfg.engine.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.optim.learning_rate == pytest.approx(3e-4) and isinstance(cfg.optim.learning_rate, float)
    assert cfg.data.data_split == [1.0, 0.0, 0.0]
    # Untouched fields keep their defaults, including SFT's own learning-rate-free defaults.
    assert cfg.engine.gradient_clipping == 1.0
    assert cfg.engine.lora.alpha == 16.0
    assert cfg.train.micro_batch_size == 8


@pytest.mark.parametrize(
    ("override", "get", "want"),
    [
        ("engine.zero_stage=3", lambda c: c.engine.zero_stage, 3),
        ("--engine.zero-stage=3", lambda c: c.engine.zero_stage, 3),  # flag spelling works too
        ("engine.lora.r=16", lambda c: c.engine.lora.r, 16),
        ("data.data_split=[2,4,4]", lambda c: c.data.data_split, [2.0, 4.0, 4.0]),
        ("data.data_split=2,4,4", lambda c: c.data.data_split, [2.0, 4.0, 4.0]),
        ("data.data_split=[1, 2.5, 0]", lambda c: c.data.data_split, [1.0, 2.5, 0.0]),
        (
            "engine.lora.target_modules=q_proj,v_proj",
            lambda c: c.engine.lora.target_modules,
            ["q_proj", "v_proj"],
        ),
        ("optim.learning_rate=1e-5", lambda c: c.optim.learning_rate, 1e-5),
        ("optim.betas=[0.8,0.99]", lambda c: c.optim.betas, [0.8, 0.99]),
        ("train.resume=true", lambda c: c.train.resume, True),
        ("train.tensorboard=false", lambda c: c.train.tensorboard, False),
        ("train.tensorboard=False", lambda c: c.train.tensorboard, False),
        ("train.resume=yes", lambda c: c.train.resume, True),
        ("train.max_steps=null", lambda c: c.train.max_steps, None),
        ("train.max_steps=None", lambda c: c.train.max_steps, None),
        ("train.max_steps=~", lambda c: c.train.max_steps, None),
        ("model.tokenizer=None", lambda c: c.model.tokenizer, None),
        ("model.tokenizer=my/tok", lambda c: c.model.tokenizer, "my/tok"),
        ("data.columns={question: prompt}", lambda c: c.data.columns, {"question": "prompt"}),
        ("optim.lr_scheduler=linear", lambda c: c.optim.lr_scheduler, "linear"),
    ],
)
def test_dotted_override(override, get, want):
    base = "train.max_steps=7"  # so that the None overrides visibly replace a value
    value = get(_load(base, "model.tokenizer=other", override))
    assert value == want
    assert type(value) is type(want)


def test_unknown_key_names_the_key_and_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        _load("engine.zero_stag=3")
    msg = str(err.value)
    assert "engine.zero_stag" in msg
    assert "zero_stage" in msg and "offload_optimizer" in msg and "lora" in msg

    with pytest.raises(ConfigError, match=r"engine\.lora\.rank.*alpha, dropout, r, save, target_modules"):
        _load("engine.lora.rank=4")
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) trainer;.*engine, model, optim, train"):
        _load("trainer.epochs=2")


def test_unknown_key_in_yaml_names_the_key_and_the_file(tmp_path):
    path = _write(tmp_path, "model:\n  name_or_path: m\ndata:\n  max_len: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(SFTConfig, path)
    assert "data.max_len" in str(err.value) and "max_length" in str(err.value)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("engine.zero_stage=abc", "engine.zero_stage"),
        ("engine.zero_stage=2.5", "engine.zero_stage"),
        ("engine.zero_stage=true", "engine.zero_stage"),
        ("optim.learning_rate=fast", "optim.learning_rate"),
        ("train.resume=maybe", "train.resume"),
        ("data.data_split=[2,x,4]", "data.data_split[1]"),
        ("data.data_split=5", "data.data_split"),
        ("data.columns=prompt", "data.columns"),
        ("engine.lora=4", "engine.lora"),
        ("optim.lr_scheduler=step", "optim.lr_scheduler"),
        ("engine.lora.save=zip", "engine.lora.save"),
        ("model.name_or_path=[a,b]", "model.name_or_path"),
    ],
)
def test_wrong_type_names_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        _load(override)
    assert str(err.value).startswith(key + ":") or f" {key}:" in str(err.value), str(err.value)


def test_override_into_a_scalar_is_an_error():
    with pytest.raises(ConfigError, match="zero_stage is not a section"):
        _load("engine.zero_stage=2", "engine.zero_stage.x=1")
    with pytest.raises(ConfigError, match="key=value"):
        _load("engine.zero_stage")


def test_validation_runs_after_loading():
    with pytest.raises(ConfigError, match="model.name_or_path is required"):
        load_config(SFTConfig, overrides=["engine.zero_stage=2"])
    with pytest.raises(ConfigError, match="engine.offload_params needs engine.zero_stage=3"):
        _load("engine.offload_params=true", "engine.zero_stage=2")
    with pytest.raises(ConfigError, match="micro_batch_size"):
        load_config(RewardConfig, overrides=[MODEL, "train.micro_batch_size=0"])


def test_precedence_defaults_then_base_then_yaml_then_overrides(tmp_path):
    path = _write(tmp_path, "engine:\n  zero_stage: 2\ntrain:\n  epochs: 3\n  seed: 5\n")
    base = {"engine": {"zero_stage": 1, "gradient_clipping": 0.5}, "train": {"epochs": 2, "log_every": 9}}
    cfg = _load("train.seed=11", "engine.lora.r=4", path=path, base=base)
    assert cfg.engine.gradient_clipping == 0.5  # base beats default
    assert cfg.train.log_every == 9
    assert cfg.engine.zero_stage == 2  # YAML beats base
    assert cfg.train.epochs == 3
    assert cfg.train.seed == 11  # override beats YAML
    assert cfg.engine.lora.r == 4  # an override into a section YAML did not mention keeps the rest
    assert cfg.train.micro_batch_size == 8  # default where nobody spoke
    assert cfg.optim.learning_rate == 1e-4  # SFT's own default, not OptimConfig's
    assert load_config(RewardConfig, overrides=[MODEL]).optim.learning_rate == 5e-5
    # The caller's base dict is not modified by the YAML and the overrides.
    assert base == {
        "engine": {"zero_stage": 1, "gradient_clipping": 0.5},
        "train": {"epochs": 2, "log_every": 9},
    }


def test_later_override_wins():
    assert _load("engine.zero_stage=1", "engine.zero_stage=3").engine.zero_stage == 3


def test_bad_yaml_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(SFTConfig, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(SFTConfig, _write(tmp_path, "engine: [unclosed\n"))
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(SFTConfig, _write(tmp_path, "- a\n- b\n"))


def test_field_docs_read_attribute_docstrings():
    docs = field_docs(SFTConfig)
    assert docs["model"] == "The model to fine-tune."
    assert docs["optim"] == "Optimizer and schedule."
    rows = {key: (default, doc) for key, default, doc in describe(SFTConfig)}
    assert rows["engine.zero_stage"][0] == "0"
    assert rows["engine.zero_stage"][1].startswith("DeepSpeed ZeRO stage")
    assert rows["engine.lora.r"][1] == "LoRA rank; 0 disables LoRA and trains all weights."
    # A section's default comes from its parent (SFT and reward steps default to different rates).
    assert rows["optim.learning_rate"][0] == "0.0001"
    assert {k: d for k, d, _ in describe(RewardConfig)}["optim.learning_rate"] == "5e-05"
    assert "engine.lora" not in rows  # sections expand into their leaves


@pytest.mark.parametrize("cls", [SFTConfig, RewardConfig])
def test_every_leaf_field_is_documented(cls):
    undocumented = [key for key, _, doc in describe(cls) if not doc.strip()]
    assert not undocumented, f"{cls.__name__} fields without a docstring: {undocumented}"


def test_format_help_lists_every_leaf_with_doc_and_default():
    text = format_help(SFTConfig)
    lines = text.splitlines()
    assert len(lines) == len(describe(SFTConfig))
    (line,) = [ln for ln in lines if ln.split()[0] == "engine.zero_stage"]
    assert "DeepSpeed ZeRO stage" in line and line.endswith("[default: 0]")
    assert any(ln.split()[0] == "data.data_split" and "[default: [2.0, 4.0, 4.0]]" in ln for ln in lines)


def test_save_yaml_round_trip(tmp_path):
    cfg = _load(
        "engine.zero_stage=3",
        "engine.lora.r=8",
        "engine.lora.target_modules=q_proj,v_proj",
        "data.data_split=1,2,3",
        "data.columns={question: prompt}",
        "optim.learning_rate=2e-5",
        "train.max_steps=None",
        "model.tokenizer=tok",
    )
    path = tmp_path / "saved.yaml"
    save_yaml(cfg, path)
    again = load_config(SFTConfig, path)
    assert again == cfg
    save_yaml(again, tmp_path / "again.yaml")
    assert (tmp_path / "again.yaml").read_text() == path.read_text()
