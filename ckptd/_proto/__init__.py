"""Generated protobuf/gRPC stubs; regenerate with scripts/gen_proto.py."""
