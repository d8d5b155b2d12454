"""Generated protobuf and gRPC code for loramux.v1 (make proto)."""
