"""gradguard.keras (work in progress)."""
