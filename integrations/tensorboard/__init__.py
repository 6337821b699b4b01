"""gradguard sink for TensorBoard (being built)."""
