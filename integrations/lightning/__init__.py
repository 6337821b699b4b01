"""gradguard.lightning (work in progress)."""
