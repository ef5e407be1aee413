"""`cartridge merge`: an adapter folded into its base, with logit verification."""
