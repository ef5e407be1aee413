"""Offline tooling: the adapter trainer, the merge tool, and the file formats shared with the server."""
