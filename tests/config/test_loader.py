"""The typed config loader: YAML, dotted overrides, precedence, errors that name the key, field docs,
range validation and the keys of the first release that moved."""

from __future__ import annotations

import pytest

from chatforge.config import (
    ConfigError,
    DPOConfig,
    PPOConfig,
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
        "model:\n  name_or_path: my/model\n  zero_stage: 2\n  lora_r: 8\n  learning_rate: 3e-4\n"
        "engine:\n  offload: true\n"  # PyYAML reads 3e-4 (no dot) as a string; the loader converts
        "data:\n  data_split: [1, 0, 0]\n",
    )
    cfg = load_config(SFTConfig, path)
    assert cfg.model.name_or_path == "my/model"
    assert cfg.model.zero_stage == 2 and cfg.model.lora_r == 8 and cfg.engine.offload
    assert cfg.model.learning_rate == pytest.approx(3e-4) and isinstance(cfg.model.learning_rate, float)
    assert cfg.data.data_split == [1.0, 0.0, 0.0]
    assert cfg.optim.gradient_clipping == 1.0  # untouched fields keep their defaults
    assert cfg.batch.micro_batch_size == 8


@pytest.mark.parametrize(
    ("override", "get", "want"),
    [
        ("model.zero_stage=3", lambda c: c.model.zero_stage, 3),
        ("--model.zero-stage=3", lambda c: c.model.zero_stage, 3),  # flag spelling works too
        ("model.lora_r=16", lambda c: c.model.lora_r, 16),
        ("data.data_split=[2,4,4]", lambda c: c.data.data_split, [2.0, 4.0, 4.0]),
        ("data.data_split=2,4,4", lambda c: c.data.data_split, [2.0, 4.0, 4.0]),
        ("data.data_split=[1, 2.5, 0]", lambda c: c.data.data_split, [1.0, 2.5, 0.0]),
        ("model.learning_rate=1e-5", lambda c: c.model.learning_rate, 1e-5),
        ("train.resume=true", lambda c: c.train.resume, True),
        ("train.resume=yes", lambda c: c.train.resume, True),
        ("train.report_to=[none]", lambda c: c.train.report_to, ["none"]),
        ("train.report_to=tensorboard,wandb", lambda c: c.train.report_to, ["tensorboard", "wandb"]),
        ("train.max_steps=null", lambda c: c.train.max_steps, None),
        ("train.max_steps=None", lambda c: c.train.max_steps, None),
        ("train.max_steps=~", lambda c: c.train.max_steps, None),
        ("engine.attn_implementation=None", lambda c: c.engine.attn_implementation, None),
        ("engine.attn_implementation=eager", lambda c: c.engine.attn_implementation, "eager"),
        ("data.columns={question: prompt}", lambda c: c.data.columns, {"question": "prompt"}),
        ("optim.lr_scheduler=linear", lambda c: c.optim.lr_scheduler, "linear"),
        ("model.dropout=true", lambda c: c.model.dropout, True),
    ],
)
def test_dotted_override(override, get, want):
    base = ("train.max_steps=7", "engine.attn_implementation=sdpa")  # None overrides visibly replace a value
    value = get(_load(*base, override))
    assert value == want
    assert type(value) is type(want)


def test_unknown_key_names_the_key_and_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        _load("engine.ofload=3")
    msg = str(err.value)
    assert "engine.ofload" in msg and "offload" in msg and "precision" in msg
    with pytest.raises(
        ConfigError, match=r"unknown config key\(s\) trainer;.*batch, data, engine, model, optim, train"
    ):
        _load("trainer.epochs=2")


@pytest.mark.parametrize(
    ("cls", "override", "names"),
    [
        (SFTConfig, "engine.zero_stage=2", "model.zero_stage"),
        (SFTConfig, "engine.lora.r=8", "lora_r"),
        (SFTConfig, "optim.learning_rate=1e-4", "learning_rate"),
        (SFTConfig, "train.micro_batch_size=4", "batch.micro_batch_size"),
        (SFTConfig, "train.epochs=2", "batch.epochs"),
        (SFTConfig, "model.disable_dropout=false", "model.dropout"),
        (SFTConfig, "data.seed=3", "fixed per dataset"),
        (SFTConfig, "train.tensorboard=false", "train.report_to"),
        (PPOConfig, "actor_engine.zero_stage=3", "actor.zero_stage"),
        (PPOConfig, "actor_optim.learning_rate=1e-6", "actor.learning_rate"),
        (PPOConfig, "generation.max_new_tokens=8", "rollout."),
        (PPOConfig, "ppo.kl_coef=0.1", "algorithm."),
        (PPOConfig, "train.rollout_batch_size=4", "rollout.batch_size"),
        (PPOConfig, "train.task_check=m:f", "eval.gold"),
        (PPOConfig, "reward.name_or_path=d", "reward.models"),
        (PPOConfig, "ema.enabled=true", "ema.decay"),
    ],
)
def test_keys_of_the_first_release_name_their_new_place(cls, override, names):
    with pytest.raises(ConfigError) as err:
        load_config(cls, None, [override])
    msg, key = str(err.value), override.split("=")[0]
    assert (key in msg or key.rsplit(".", 1)[0] + " " in msg) and names in msg and "\n" not in msg, msg


def test_unknown_key_in_yaml_names_the_key_and_the_file(tmp_path):
    path = _write(tmp_path, "model:\n  name_or_path: m\ndata:\n  max_len: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(SFTConfig, path)
    assert "data.max_len" in str(err.value) and "max_length" in str(err.value)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.zero_stage=abc", "model.zero_stage"),
        ("model.zero_stage=2.5", "model.zero_stage"),
        ("model.zero_stage=true", "model.zero_stage"),
        ("model.learning_rate=fast", "model.learning_rate"),
        ("train.resume=maybe", "train.resume"),
        ("data.data_split=[2,x,4]", "data.data_split[1]"),
        ("data.data_split=5", "data.data_split"),
        ("data.columns=prompt", "data.columns"),
        ("engine=4", "engine"),
        ("optim.lr_scheduler=step", "optim.lr_scheduler"),
        ("model.name_or_path=[a,b]", "model.name_or_path"),
    ],
)
def test_wrong_type_names_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        _load(override)
    assert str(err.value).startswith(key + ":") or f" {key}:" in str(err.value), str(err.value)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("batch.epochs=-1", "batch.epochs must be >= 1"),
        ("batch.epochs=0", "batch.epochs must be >= 1"),
        ("model.learning_rate=-1e-5", "model.learning_rate must be > 0"),
        ("model.learning_rate=0", "model.learning_rate must be > 0"),
        ("model.zero_stage=4", "model.zero_stage must be 0, 1, 2 or 3"),
        ("model.lora_r=-2", "model.lora_r must be >= 0"),
        ("batch.micro_batch_size=0", "batch.micro_batch_size must be >= 1"),
        ("train.max_steps=0", "train.max_steps must be >= 1"),
        ("train.eval_every=-5", "train.eval_every must be >= 0"),
        ("train.report_to=[tensorbored]", "train.report_to: unknown tracker"),
        ("data.eval_fraction=1.5", "data.eval_fraction must be in"),
        ("data.data_split=[1,-1,1]", "data.data_split must be 3 non-negative"),
        ("engine.offload=true", "engine.offload needs ZeRO >= 1"),
        ("optim.warmup=-0.1", "optim.warmup"),
    ],
)
def test_nonsense_settings_are_refused_at_validation(override, match):
    with pytest.raises(ConfigError, match=match):
        _load(override)


def test_rl_combinations_are_refused_at_validation():
    base = ["actor.name_or_path=a", "reward.models=[r]"]
    with pytest.raises(ConfigError, match="n_samples_per_prompt >= 2"):
        load_config(PPOConfig, None, [*base, "algorithm.name=grpo"])
    with pytest.raises(ConfigError, match="needs a reward"):
        load_config(PPOConfig, None, ["actor.name_or_path=a"])
    with pytest.raises(ConfigError, match="kl_limit must be above"):
        load_config(PPOConfig, None, [*base, "algorithm.kl_target=5", "algorithm.kl_limit=4"])
    with pytest.raises(ConfigError, match="ptx.datasets"):
        load_config(PPOConfig, None, [*base, "ptx.coef=0.5"])
    with pytest.raises(ConfigError, match="rollout.temperature must be > 0"):
        load_config(PPOConfig, None, [*base, "rollout.temperature=0"])
    cfg = load_config(PPOConfig, None, [*base, "algorithm.name=rloo", "rollout.n_samples_per_prompt=4"])
    assert not cfg.algorithm.has_critic and cfg.critic.name_or_path == ""  # no critic is built or filled
    ppo = load_config(PPOConfig, None, base)
    assert ppo.critic.name_or_path == "r" and ppo.ref.name_or_path == "a"
    with pytest.raises(ConfigError, match="dpo.label_smoothing applies to the sigmoid loss only"):
        load_config(DPOConfig, None, ["policy.name_or_path=p", "dpo.loss=ipo", "dpo.label_smoothing=0.1"])


def test_override_into_a_scalar_is_an_error():
    with pytest.raises(ConfigError, match="zero_stage is not a section"):
        _load("model.zero_stage=2", "model.zero_stage.x=1")
    with pytest.raises(ConfigError, match="key=value"):
        _load("model.zero_stage")


def test_validation_runs_after_loading():
    with pytest.raises(ConfigError, match="model.name_or_path is required"):
        load_config(SFTConfig, overrides=["model.zero_stage=2"])
    with pytest.raises(ConfigError, match="micro_batch_size"):
        load_config(RewardConfig, overrides=[MODEL, "batch.micro_batch_size=0"])


def test_precedence_defaults_then_base_then_yaml_then_overrides(tmp_path):
    path = _write(tmp_path, "model:\n  zero_stage: 2\nbatch:\n  epochs: 3\ntrain:\n  seed: 5\n")
    base = {"model": {"zero_stage": 1}, "optim": {"gradient_clipping": 0.5}, "batch": {"epochs": 2}}
    cfg = _load("train.seed=11", "model.lora_r=4", path=path, base=base)
    assert cfg.optim.gradient_clipping == 0.5  # base beats default
    assert cfg.model.zero_stage == 2  # YAML beats base
    assert cfg.batch.epochs == 3
    assert cfg.train.seed == 11  # override beats YAML
    assert cfg.model.lora_r == 4  # an override into a section YAML mentioned keeps the rest
    assert cfg.batch.micro_batch_size == 8  # default where nobody spoke
    assert cfg.model.learning_rate == 1e-4  # SFT's own default
    assert load_config(RewardConfig, overrides=[MODEL]).model.learning_rate == 5e-5
    # The caller's base dict is not modified by the YAML and the overrides.
    assert base == {"model": {"zero_stage": 1}, "optim": {"gradient_clipping": 0.5}, "batch": {"epochs": 2}}


def test_later_override_wins():
    assert _load("model.zero_stage=1", "model.zero_stage=3").model.zero_stage == 3


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
    assert rows["model.zero_stage"][0] == "0"
    assert rows["model.zero_stage"][1].startswith("DeepSpeed ZeRO stage")
    # A section's default comes from its parent (SFT and reward steps default to different rates).
    assert rows["model.learning_rate"][0] == "0.0001"
    assert {k: d for k, d, _ in describe(RewardConfig)}["model.learning_rate"] == "5e-05"
    assert "model" not in rows  # sections expand into their leaves


@pytest.mark.parametrize("cls", [SFTConfig, RewardConfig, DPOConfig, PPOConfig])
def test_every_leaf_field_is_documented(cls):
    undocumented = [key for key, _, doc in describe(cls) if not doc.strip()]
    assert not undocumented, f"{cls.__name__} fields without a docstring: {undocumented}"


def test_format_help_lists_every_leaf_with_doc_and_default():
    text = format_help(SFTConfig)
    lines = text.splitlines()
    assert len(lines) == len(describe(SFTConfig))
    (line,) = [ln for ln in lines if ln.split()[0] == "model.zero_stage"]
    assert "DeepSpeed ZeRO stage" in line and line.endswith("[default: 0]")
    assert any(ln.split()[0] == "data.data_split" and "[default: [2.0, 4.0, 4.0]]" in ln for ln in lines)
    assert len(format_help(PPOConfig).splitlines()) < 60


def test_save_yaml_round_trip(tmp_path):
    cfg = _load(
        "model.zero_stage=3",
        "model.lora_r=8",
        "data.data_split=1,2,3",
        "data.columns={question: prompt}",
        "model.learning_rate=2e-5",
        "train.max_steps=None",
        "engine.attn_implementation=eager",
    )
    path = tmp_path / "saved.yaml"
    save_yaml(cfg, path)
    again = load_config(SFTConfig, path)
    assert again == cfg
    save_yaml(again, tmp_path / "again.yaml")
    assert (tmp_path / "again.yaml").read_text() == path.read_text()
