"""Canary and drain: set/promote/rollback, progressive canaries gated on traffic, the persisted canary state."""
