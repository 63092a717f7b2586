"""Sources (datasets read as Arrow record batches) and sinks (the output writer)."""
