"""Live load: scrape the replicas' /metrics (every engine's names) into load reports and fast-path EDS weights."""
