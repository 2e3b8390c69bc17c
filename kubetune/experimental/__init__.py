"""Methods whose interface may still change: import them from here so callers see it."""
