"""`imesh` subcommands that operate a running mesh, one module per group (kept out of cli.py)."""
