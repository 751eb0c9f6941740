"""`imesh`'s commands, one module per command or group; imesh/cli.py registers them on the root group."""
