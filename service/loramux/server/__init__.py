"""The loramux server: engine, adapter cache and gRPC layer. Needs the `server` extra."""
