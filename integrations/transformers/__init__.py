"""gradguard for Hugging Face ``transformers.Trainer`` (being built)."""
