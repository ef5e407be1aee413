"""The cartridge gRPC API, generated from protos/ at build time."""
