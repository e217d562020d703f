"""Keys of the first release's configs that moved or went away: a YAML file or override still using one gets
a one-line error naming the new key, instead of 'unknown key'."""

from __future__ import annotations

# section type name -> {old key inside that section: new key relative to the command root, or why it went}
MOVED: dict[str, dict[str, str]] = {
    "PPOConfig": {
        "actor_engine": "actor.zero_stage, actor.lora_r and engine.* (shared by all models)",
        "critic_engine": "critic.zero_stage, critic.lora_r and engine.*",
        "ref_engine": "nothing: the reference follows actor.zero_stage",
        "reward_engine": "nothing: reward models follow critic.zero_stage",
        "actor_optim": "actor.learning_rate and optim.* (shared by actor and critic)",
        "critic_optim": "critic.learning_rate and optim.*",
        "generation": "rollout.* (max_new_tokens, temperature, stop_strings)",
        "ppo": "algorithm.* (epochs, num_minibatches, clip_range, lam, kl_*) and reward.clip",
    },
    "SupervisedModel": {
        "disable_dropout": "model.dropout (inverted: dropout=true keeps it)",
        "tokenizer": "nothing: the tokenizer is read from the model dir",
        "trust_remote_code": "engine.trust_remote_code",
        "attn_implementation": "engine.attn_implementation",
    },
    "TrainedModel": {
        "disable_dropout": "nothing: RL and DPO forwards never use dropout",
        "tokenizer": "nothing: the tokenizer is read from the model dir",
        "trust_remote_code": "engine.trust_remote_code",
        "attn_implementation": "engine.attn_implementation",
    },
    "FrozenModel": {
        "disable_dropout": "nothing: frozen models never use dropout",
        "tokenizer": "nothing: the tokenizer is read from the model dir",
    },
    "RewardSignalConfig": {
        "name_or_path": "reward.models=[DIR]",
        "missing_eos_penalty": "reward.functions=[chatforge.rewards.rules:unfinished*-PENALTY]",
        "normalize": "nothing: reward-model scores are normalised whenever reward_stats.json exists",
    },
    "EngineConfig": {
        "zero_stage": "{model}.zero_stage",
        "lora": "{model}.lora_r (LoRA alpha is 2 x rank)",
        "offload_optimizer": "engine.offload",
        "offload_params": "engine.offload",
        "gradient_clipping": "optim.gradient_clipping",
    },
    "OptimConfig": {
        "learning_rate": "{model}.learning_rate",
        "warmup_ratio": "optim.warmup (a fraction when < 1)",
        "warmup_steps": "optim.warmup (a step count when >= 1)",
        "betas": "nothing: AdamW uses betas (0.9, 0.95)",
        "eps": "nothing: AdamW uses eps 1e-8",
        "min_lr_ratio": "nothing: decay goes to 0",
    },
    "RunConfig": {
        "micro_batch_size": "batch.micro_batch_size",
        "gradient_accumulation_steps": "batch.gradient_accumulation_steps",
        "epochs": "batch.epochs",
        "rollout_batch_size": "rollout.batch_size",
        "eval_prompts": "eval.prompts",
        "task_check": "eval.gold=[module:function]",
        "tensorboard": "train.report_to=[tensorboard] (or [none])",
        "log_every": "nothing: every step is logged",
        "keep_checkpoints": "nothing: the last checkpoint (and with a gold signal, the best) is kept",
        "ema_model_dir": "nothing: the EMA actor goes to <final_model_dir>-ema",
        "critic_model_dir": "nothing: the critic is saved to <output_dir>/critic",
    },
    "PromptDataConfig": {
        "seed": "nothing: the step split is fixed per dataset (train.seed orders the batches)",
        "format": "a ':format=NAME' suffix on the dataset spec",
        "split": "a ':split=NAME' suffix on the dataset spec",
        "max_length": "nothing in step 3: responses are bounded by rollout.max_new_tokens",
        "loss_on": "nothing outside SFT",
        "packing": "nothing outside SFT",
    },
    "PTXConfig": {
        "data": "ptx.datasets",
        "micro_batch_size": "nothing: each actor step takes as many PTX rows as its mini-batch has",
    },
    "EMAConfig": {
        "enabled": "ema.decay (> 0 turns the EMA on)",
        "on_cpu": "nothing: the EMA lives on rank 0",
    },
}


# The trained model's section of each command, for messages about keys that moved into it.
MODEL_SECTION = {
    "SFTConfig": "model",
    "RewardConfig": "model",
    "DPOConfig": "policy",
    "PPOConfig": "actor (or critic)",
}


def moved_message(cls: type, key: str, prefix: str, root: type | None = None) -> str | None:
    """'<prefix><key> is no longer a setting; use <new>' for a key of the first release, else None."""
    model = MODEL_SECTION.get(getattr(root, "__name__", ""), "model")
    for klass in cls.__mro__:
        table = MOVED.get(klass.__name__, {})
        for old, new in table.items():
            if key == old or key.startswith(old + "."):
                return f"{prefix}{key} is no longer a setting; use {new.format(model=model)}"
    return None
