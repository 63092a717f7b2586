"""Job files: the pydantic models a job is validated into."""
