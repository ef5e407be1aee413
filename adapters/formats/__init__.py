"""On-disk formats that training, merging and serving must agree on: base checkpoints,
peft adapter directories, NF4 quantization, chat rendering and the adapter store's layout (read side).
The server imports only this package."""
