"""Operations: events, OpenTelemetry and Prometheus adapters, the inspector and the CLI."""
