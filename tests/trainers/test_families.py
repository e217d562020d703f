"""Step 3 on checkpoints shaped like the real ones (chatforge.fixtures.families): OPT with dropout 0.1 and no
chat template, Qwen2.5 with ChatML ('\\n' after <|im_end|>), Llama 3 (BOS in the template, turns ending at
<|eot_id|>, no pad token), GPT-2 with dropout 0.1 and no pad token. For every family: the first update's
ratio is exactly 1 and KL 0; step 2 and step 3 score the same token of the same conversation; greedy
generation equals transformers' generate; a left-padded batch equals its rows alone."""

from __future__ import annotations

import json

import pytest
import torch

from chatforge.fixtures.families import REAL_FAMILIES
from tests.trainers.test_ppo import make_config, prompt_batch, trainer_for


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    from chatforge.fixtures.families import write_family_fixtures

    return write_family_fixtures(tmp_path_factory.mktemp("families"))


def test_the_fixtures_look_like_the_real_checkpoints(families):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    assert AutoConfig.from_pretrained(families["opt"]).dropout == 0.1
    assert AutoConfig.from_pretrained(families["gpt2"]).resid_pdrop == 0.1
    assert AutoTokenizer.from_pretrained(families["gpt2"]).pad_token is None
    assert AutoTokenizer.from_pretrained(families["llama3"]).pad_token is None
    qwen = AutoTokenizer.from_pretrained(families["qwen2"])
    text = qwen.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], tokenize=False
    )
    assert text.endswith("yo<|im_end|>\n")  # text after the end-of-turn token
    llama = AutoTokenizer.from_pretrained(families["llama3"])
    gen = GenerationConfig.from_pretrained(families["llama3"])
    assert (
        llama.eos_token == "<|end_of_text|>" and llama.convert_tokens_to_ids("<|eot_id|>") in gen.eos_token_id
    )


@pytest.mark.parametrize("family", REAL_FAMILIES)
def test_first_update_has_ratio_one_and_kl_zero_despite_dropout(families, task_files, tmp_path, family):
    cfg = make_config(families[family], families[f"reward-{family}"], task_files, tmp_path)
    trainer = trainer_for(cfg)
    exp = trainer.generate_experience(prompt_batch(trainer))
    assert exp.response_mask.sum() > 0
    torch.testing.assert_close(exp.ref_logprobs, exp.logprobs, rtol=0, atol=0)
    stats = trainer.train_rlhf(exp)
    assert stats["kl"] == 0.0 and stats["clip_frac_first"] == 0.0
    assert stats["ratio_first"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("family", REAL_FAMILIES)
def test_step2_and_step3_score_the_same_token(families, task_files, tmp_path, family):
    """The reward model sees in step 3 exactly what step 2 trained it on: the prompt, then the reply up to
    and including its first end-of-turn token (ChatML's '\\n' after <|im_end|> is not part of it)."""
    from transformers import AutoTokenizer

    from chatforge.data.render import ChatRenderer, end_of_turn_ids
    from chatforge.data.tokenize import Limits, Tally, ppo_row, reward_row

    tok = AutoTokenizer.from_pretrained(families[family])
    tok.pad_token = tok.pad_token or tok.eos_token
    renderer, lim = ChatRenderer(tok), Limits(64, 128)
    row = {
        "prompt": [{"role": "user", "content": "What is 2 + 3?"}], "chosen": [{"role": "assistant", "content": "5"}],
        "rejected": [{"role": "assistant", "content": "6"}], "row": 1,
    }  # fmt: skip
    (pair,) = reward_row(renderer, row, lim, Tally(), "mem")
    (prompt,) = ppo_row(renderer, {**row, "extra": "{}"}, lim, Tally(), "mem")
    chosen = pair["chosen_input_ids"]
    assert chosen[: pair["prompt_len"]] == prompt["prompt_input_ids"]  # step 3's prompt is step 2's
    assert chosen[-1] in end_of_turn_ids(tok)  # scored at the end-of-turn token a rollout stops at
    # A rollout that writes the chosen reply stops at that token; its scored sequence is step 2's row.
    response = chosen[pair["prompt_len"] :]
    stop = next(i for i, t in enumerate(response) if t in end_of_turn_ids(tok))
    assert prompt["prompt_input_ids"] + response[: stop + 1] == chosen


@pytest.mark.parametrize("family", REAL_FAMILIES)
def test_greedy_rollouts_equal_transformers_generate_and_padding_changes_nothing(
    families, task_files, tmp_path, family
):
    from transformers import AutoModelForCausalLM, GenerationConfig

    cfg = make_config(
        families[family], families[f"reward-{family}"], task_files, tmp_path, rollout={"max_new_tokens": 6}
    )
    trainer = trainer_for(cfg)
    batch = prompt_batch(trainer)
    assert (batch["attention_mask"][:, 0] == 0).any()  # really left padded
    greedy = GenerationConfig(do_sample=False, max_new_tokens=6)
    ours = trainer.rollout(batch, trainer._rollout_config().__class__(max_new_tokens=6, do_sample=False))
    hf = AutoModelForCausalLM.from_pretrained(families[family]).eval()
    with torch.no_grad():
        want = hf.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], generation_config=greedy,
            pad_token_id=trainer.tokenizer.pad_token_id, eos_token_id=trainer.stop_ids,
        )  # fmt: skip
    got = ours.sequences * torch.cat([batch["attention_mask"], ours.response_mask], 1).bool()
    want = want[:, : got.shape[1]] * torch.cat([batch["attention_mask"], ours.response_mask], 1).bool()
    assert torch.equal(got, want)
    # The engine's verbs on a left-padded batch equal each row alone.
    e, prompt_len = trainer.engine, batch["input_ids"].shape[1]
    attention = torch.cat([batch["attention_mask"], ours.response_mask], 1)
    together = e.actor.logprobs(ours.sequences, attention, prompt_len)[0]
    scores = e.reward_models[0].engine.scores(ours.sequences, attention)
    for i in range(ours.sequences.shape[0]):
        start = int((attention[i] == 0).sum())  # this row without its left padding
        real = int(batch["attention_mask"][i].sum())
        alone = e.actor.logprobs(
            ours.sequences[i : i + 1, start - start :], attention[i : i + 1], prompt_len
        )[0]
        torch.testing.assert_close(alone, together[i : i + 1], atol=1e-5, rtol=0)
        ids = ours.sequences[i, prompt_len - real :][attention[i, prompt_len - real :].bool()]
        single = e.reward_models[0].engine.scores(ids[None], torch.ones_like(ids)[None])
        torch.testing.assert_close(single, scores[i : i + 1], atol=1e-5, rtol=0)


def test_remove_dropout_reaches_float_attributes_and_the_engine_checks_it(families):
    """Llama/Qwen2 keep `attention_dropout` as a float on each attention module and OPT `dropout` and
    `layerdrop` floats: removing nn.Dropout modules alone would leave them on."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from chatforge.models.loading import remove_dropout

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, attention_dropout=0.3))  # fmt: skip
    opt = AutoModelForCausalLM.from_pretrained(families["opt"])
    for m in (model, opt):
        assert any(
            isinstance(v, float) and v > 0 for mod in m.modules() for k, v in vars(mod).items() if "drop" in k
        )
        remove_dropout(m)
        left = [
            (k, v)
            for mod in m.modules()
            for k, v in vars(mod).items()
            if "drop" in k and isinstance(v, float) and v
        ]
        assert not left and not any(
            getattr(mod, "p", 0) for mod in m.modules() if isinstance(mod, torch.nn.Dropout)
        )
        m.train()
        ids = torch.arange(3, 11)[None] % 30 + 2
        torch.testing.assert_close(m(input_ids=ids).logits, m(input_ids=ids).logits, rtol=0, atol=0)


def test_a_dropout_chatforge_cannot_remove_is_a_loud_error(fixture_dir):
    from chatforge.engine import DropoutStillActive, ModelSpec, TrainEngine
    from chatforge.models.loading import LoadOptions, load_causal_lm

    def noisy(dtype):
        model = load_causal_lm(str(fixture_dir / "llama"), LoadOptions(), dtype)
        # A family that hides its rate under another name (e.g. a stochastic-depth "p_skip").
        model.model.norm.register_forward_hook(
            lambda m, i, out: torch.nn.functional.dropout(out, 0.2, training=m.training)
        )
        return model

    with pytest.raises(DropoutStillActive, match="two training-mode forwards differ"):
        TrainEngine(noisy, ModelSpec(str(fixture_dir / "llama"), precision="fp32", learning_rate=1e-5))


def test_a_reward_model_with_its_own_tokenizer_is_fed_its_own_rendering(
    families, fixture_dir, task_files, tmp_path
):
    """A Qwen2-family actor scored by a Llama 3 reward model: the reward model reads the conversation
    rendered with its own template, not the actor's token ids."""
    from transformers import AutoTokenizer

    from chatforge.data.render import ChatRenderer
    from chatforge.engine.forward import sequence_scores
    from chatforge.rewards import Responses

    cfg = make_config(families["qwen2"], families["reward-llama3"], task_files, tmp_path)
    trainer = trainer_for(cfg)
    rm = trainer.engine.reward_models[0]
    assert not rm.same_tokens
    batch = prompt_batch(trainer, 2)
    out = trainer.rollout(batch, trainer._rollout_config())
    attention = torch.cat([batch["attention_mask"], out.response_mask], 1)
    responses = trainer._responses(batch, out, attention)
    got = rm.score(responses)
    tok = AutoTokenizer.from_pretrained(families["reward-llama3"])
    renderer = ChatRenderer(tok)
    for i, (messages, text) in enumerate(zip(responses.messages, responses.responses)):
        ids = renderer.prompt_ids(messages) + renderer.scored_reply_ids(
            messages, [{"role": "assistant", "content": text}]
        )
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.convert_tokens_to_ids("<|eot_id|>")
        want = sequence_scores(
            rm.engine.module, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)
        )
        torch.testing.assert_close(got[i : i + 1], want.float(), atol=1e-5, rtol=0)
    assert isinstance(responses, Responses) and json.dumps(responses.messages)
