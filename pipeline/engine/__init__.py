"""The engine every front end shares: planning, row selection, scheduling, limits, retries, costs."""
