"""The adapter store: every version of every adapter, immutable and checked (versions.py), and which one
of each name is live, with the log of every release and rollback (live.py). Torch-free, so the release
commands start at once and the server can read it."""
