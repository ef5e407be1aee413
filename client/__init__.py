"""Python client and `cartridge` command for a Cartridge server; needs only grpc and the generated protos."""
