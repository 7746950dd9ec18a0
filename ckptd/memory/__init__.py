"""The memory tier: the shared-memory slot pool the trainers write into, and the catalog of
steps and shards the daemon holds (which tier holds what, at which state)."""
