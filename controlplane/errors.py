"""Errors the control plane reports to API callers as they are."""


class ConfigRejected(RuntimeError):
    """Envoy NACKed a change; the message carries Envoy's own words. The change was reverted."""
