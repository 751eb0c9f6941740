"""Errors the control plane reports as they are: to API callers, or at start-up to the operator."""


class ConfigRejected(RuntimeError):
    """Envoy NACKed a change; the message carries Envoy's own words. The change was reverted."""


class InvalidRequest(ValueError):
    """The request names something that does not exist or a value out of range (INVALID_ARGUMENT)."""


class Conflict(RuntimeError):
    """The request is valid but the mesh's state forbids it now, e.g. another canary is in
    progress (FAILED_PRECONDITION); the message says what to do first."""


class StateError(RuntimeError):
    """The state directory cannot be used: a damaged state file with no good copy to fall back
    on, or another control plane holding the directory. The message says what to do."""
