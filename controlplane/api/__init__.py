"""The mesh gRPC API the CLI and the ext_procs call (protos/mesh.proto)."""
