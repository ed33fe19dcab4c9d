"""The swav-service HTTP API (FastAPI): datasets, jobs, events, checkpoints."""
