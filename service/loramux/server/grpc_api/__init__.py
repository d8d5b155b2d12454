"""The gRPC layer: protobuf <-> domain calls, and nothing else."""
