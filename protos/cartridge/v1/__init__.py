"""Generated gRPC code for the cartridge.v1 API; built from protos/ by setup.py, never edited."""
