"""Ray Serve applications: ingest and query."""
