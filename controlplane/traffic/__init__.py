"""Request telemetry: Envoy's access-log stream -> RequestRecords -> /metrics, `imesh status` traffic, canary gates."""
