"""The restore path: the planner that picks the newest committed step and the nearest surviving
copy of each shard, the restore service (leases), progress streaming and restore-slot
preparation at start-up."""
