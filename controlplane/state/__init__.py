"""Persisted desired state: the spec, the live overrides and the config version, written atomically."""
