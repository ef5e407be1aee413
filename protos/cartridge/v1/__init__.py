"""Generated gRPC code for the cartridge.v1 API; built from protos/ by protos/build_backend.py, never edited."""
