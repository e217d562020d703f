"""ChatModel: replies come from the model through its chat template; streams, batches, limits, adapters."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from chatforge.inference import ChatModel, ChatTemplateError, ContextLengthError

HELLO = [{"role": "user", "content": "Hello!"}]
MATH = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 3 + 4?"}]
GREEDY = {"temperature": 0.0, "max_new_tokens": 10}


def test_greedy_reply_equals_transformers_generate(chat_model, chat_model_dir):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(str(chat_model_dir))
    ids = chat_model.tokenizer.apply_chat_template(HELLO, add_generation_prompt=True, return_dict=False)
    assert chat_model.tokenizer.decode(ids).endswith("<|user|>Hello!<|end|><|assistant|>")
    out = reference.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False)
    expected = chat_model.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
    completion = chat_model.complete(HELLO, **GREEDY)
    assert completion.text == expected and expected.strip()
    assert (completion.prompt_tokens, completion.completion_tokens, completion.finish_reason) == (
        len(ids),
        10,
        "length",
    )


def test_stream_joins_to_the_whole_reply(chat_model):
    for gen in (GREEDY, {"max_new_tokens": 16, "seed": 7, "temperature": 0.8, "top_p": 0.9}):
        stream = chat_model.stream_chat(MATH, **gen)
        deltas = list(stream)
        assert len(deltas) > 1
        assert "".join(deltas) == chat_model.chat(MATH, **gen) == stream.completion.text


def test_seed_makes_sampling_reproducible(chat_model):
    a = chat_model.chat(HELLO, seed=1, max_new_tokens=12)
    assert a == chat_model.chat(HELLO, seed=1, max_new_tokens=12)
    assert a != chat_model.chat(HELLO, seed=2, max_new_tokens=12)


def test_history_changes_the_reply(chat_model):
    turn = {"role": "user", "content": "What is 3 + 4?"}
    history = [*HELLO, {"role": "assistant", "content": chat_model.chat(HELLO, **GREEDY)}, turn]
    assert chat_model.chat(history, **GREEDY) != chat_model.chat([turn], **GREEDY)


def test_batch_equals_one_by_one(chat_model):
    conversations = [HELLO, MATH, [{"role": "user", "content": "Thank you. Who are you?"}]]
    batch = chat_model.complete_batch(conversations, **GREEDY)
    assert batch == [chat_model.complete(c, **GREEDY) for c in conversations]


def test_stop_string_ends_and_is_left_out(chat_model):
    full = chat_model.chat(HELLO, **GREEDY)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    expected = full[: full.index(stop)]
    completion = chat_model.complete(HELLO, stop=[stop], **GREEDY)
    assert (completion.text, completion.finish_reason) == (expected, "stop")
    assert "".join(chat_model.stream_chat(HELLO, stop=stop, **GREEDY)) == expected
    assert chat_model.complete_batch([HELLO], stop=[stop], **GREEDY)[0].text == expected


def test_eos_gives_finish_reason_stop(chat_model_dir):
    # The unmodified fixture model answers EOS-like special tokens; forcing EOS checks the 'stop' path.
    model = ChatModel(chat_model_dir)
    model.model.lm_head.weight.data.zero_()
    model.model.lm_head.bias = None
    with torch.no_grad():
        model.model.lm_head.weight[model.eos_token_id] = 1.0
    completion = model.complete(HELLO, **GREEDY)
    assert (completion.text, completion.finish_reason, completion.completion_tokens) == ("", "stop", 1)


def test_context_length_is_checked(chat_model):
    long = [{"role": "user", "content": " 42" * 600}]
    with pytest.raises(ContextLengthError, match="at most 512"):
        chat_model.chat(long, max_new_tokens=4)
    n_prompt = len(chat_model.encode(HELLO))
    with pytest.raises(ContextLengthError, match=f"lower max_new_tokens to {512 - n_prompt}"):
        chat_model.chat(HELLO, max_new_tokens=512)
    nearly_full = [{"role": "user", "content": " 42" * 500}]
    room = 512 - len(chat_model.encode(nearly_full))
    assert 0 < room < 20
    fitted = chat_model.complete(nearly_full, max_new_tokens=100, fit_context=True, temperature=0.0)
    assert (fitted.completion_tokens, fitted.finish_reason) == (room, "length")


def test_concurrent_callers_get_their_own_replies(chat_model):
    prompts = [[{"role": "user", "content": f"Count to {i}."}] for i in range(6)]
    expected = [chat_model.chat(p, **GREEDY) for p in prompts]
    got: dict[int, str] = {}

    def worker(i: int) -> None:
        got[i] = "".join(chat_model.stream_chat(prompts[i], **GREEDY))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(len(prompts))] == expected
    assert len(set(expected)) == len(expected)


def test_missing_chat_template_is_a_clear_error_with_a_fallback(chat_model_dir, tmp_path):
    config = json.loads((chat_model_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in chat_model_dir.iterdir():
        (plain / f.name).write_bytes(f.read_bytes())
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ChatTemplateError, match="--chat-template fallback"):
        ChatModel(plain)
    model = ChatModel(plain, chat_template="fallback")
    assert model.tokenizer.decode(model.encode(MATH)) == "Be brief.\n\nHuman: What is 3 + 4?\n\nAssistant:"
    assert "\n\nHuman:" not in model.chat(MATH, max_new_tokens=30, seed=0)


def test_peft_adapter_dir_is_merged_into_its_base(chat_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(chat_model_dir))
    torch.manual_seed(0)
    peft_model = get_peft_model(
        base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(str(tmp_path / "merged"))
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (tmp_path / "merged" / f).write_bytes((chat_model_dir / f).read_bytes())
    from_adapter = ChatModel(tmp_path / "adapter").chat(MATH, **GREEDY)
    assert from_adapter == ChatModel(tmp_path / "merged").chat(MATH, **GREEDY)
    assert from_adapter != ChatModel(chat_model_dir).chat(MATH, **GREEDY)
