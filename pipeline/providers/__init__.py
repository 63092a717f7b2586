"""Provider dialects: request bodies, reply parsing and error classes; one module per provider."""
