"""The drivers that send a plan's rows: realtime (asyncio), batch (a provider's batch API) and Ray.

No driver imports another; :mod:`pipeline.engine.run` is the one place that picks one.
"""
