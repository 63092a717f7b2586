"""Rate limits: the fixed-cap limiter, auto mode's adaptive limiter, and the cluster-wide schedule for Ray."""
