"""The gRPC layer: the CheckpointService servicer, the mapping of typed errors to status codes,
and protobuf conversion. It adapts gRPC to the save, restore and admin services it is handed."""
