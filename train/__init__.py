"""QLoRA fine-tuning and adapter merge: recipes (YAML) and the thin trainer."""
