"""Model loading, LoRA (peft), reward/critic value heads, EMA."""
