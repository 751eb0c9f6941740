"""xDS: versioned snapshots, the snapshot cache (ACK/NACK, rollback) and the ADS streams Envoy opens."""
