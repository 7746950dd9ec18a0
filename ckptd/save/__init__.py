"""The save path: save leases, shard commits into the memory tier and the per-step bookkeeping
that hands a complete step to the drains."""
