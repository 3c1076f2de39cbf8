"""Model adapters: one file per DiT family."""
