"""On-disk formats that training, merging and serving must agree on: base checkpoints,
peft adapter directories, NF4 quantization and chat rendering. The server imports only this package."""
