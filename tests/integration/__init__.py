"""Through real parts: loopback servers, the CLI, the Python API, subprocesses, Ray."""
