"""otlp-middleware: per-request profiling exported as OTLP profiles."""
