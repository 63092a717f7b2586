"""Evaluation against a gold column: metrics, variants and the evaluation report."""
