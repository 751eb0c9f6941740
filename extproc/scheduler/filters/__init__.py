"""Filter plugins, one module each; registered by name in ``extproc/scheduler/registry.py``."""
