"""The Ray driver: a coordinator in the calling process, worker actors, and a watchdog for the local instance."""
