"""The shared vocabulary: types, errors, the shard layout and manifest, integrity checks,
configuration, durable file operations, logs, metrics and failpoints.

Every other layer of ckptd, and the training-side client, builds on these modules; they import
nothing above this package (checked by the import-linter contracts in pyproject.toml).
"""
