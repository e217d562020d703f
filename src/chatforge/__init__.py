"""chatforge: the InstructGPT pipeline (SFT, reward model, PPO) for any Hugging Face causal LM."""

__version__ = "0.1.0"
