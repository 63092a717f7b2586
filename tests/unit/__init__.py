"""Pure seams: one module or function at a time, no server, no subprocess, no CLI."""
