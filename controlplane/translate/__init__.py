"""Mesh model -> Envoy resources (CDS/EDS/LDS/RDS, telemetry config) and the pickers' routing table."""
