"""The user's spec: the YAML schema (pydantic, errors name file and field) and the diff `imesh apply` shows."""
