"""`cartridge eval`: an adapter against its base on held-out rows."""
