"""The server: ingest, association, storage, query API, Jaeger API, OTLP export, metrics, web UI."""
