"""Charts and self-contained HTML pages: ``pipeline report`` and the evaluation report."""
