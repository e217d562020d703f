"""`chatforge chat` driven with scripted stdin: replies come from the model, with history and /reset."""

from __future__ import annotations

import os
import subprocess
import sys

SYSTEM = {"role": "system", "content": "Be brief."}


def test_scripted_multi_turn_chat(chat_model_dir, chat_model):
    first, second = "Hello!", "What is 3 + 4?"
    script = f"{first}\n\n{second}\n/reset\n{second}\n/quit\nnever read\n"
    cmd = [
        sys.executable, "-m", "chatforge.cli", "chat", "--model", str(chat_model_dir),
        "--greedy", "--max-new-tokens", "10", "--system", SYSTEM["content"],
    ]  # fmt: skip
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    done = subprocess.run(cmd, input=script.encode(), capture_output=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr.decode()

    gen = {"temperature": 0.0, "max_new_tokens": 10}
    u1, u2 = {"role": "user", "content": first}, {"role": "user", "content": second}
    r1 = chat_model.chat([SYSTEM, u1], **gen)
    r2 = chat_model.chat([SYSTEM, u1, {"role": "assistant", "content": r1}, u2], **gen)
    r3 = chat_model.chat([SYSTEM, u2], **gen)
    assert r2 != r3, "the test model should answer differently with and without history"
    assert done.stdout.decode() == f"{r1}\n{r2}\n{r3}\n"
    assert "(conversation cleared)" in done.stderr.decode()
