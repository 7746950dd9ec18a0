"""Peer replication between node daemons: the wire format and bulk path, TLS, the peer client and
server, placement on the ring, the replicator, the replica stores and the commit across nodes."""
