"""The mesh model: spec + live overrides -> immutable facts every translation reads."""
