"""After training: gate a stored version (gate_run.py), release it, roll it back and list versions
(lifecycle.py), from the command line (cli.py)."""
