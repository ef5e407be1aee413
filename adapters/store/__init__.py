"""The adapter store's write side: new immutable versions (versions.py) and moves of each name's live
pointer, logged (live.py). Reading and checking them is adapters/formats/store_layout.py, which the
server shares. Torch-free, so the release commands start at once."""
