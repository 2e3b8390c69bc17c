"""Tools over pipelines: compare methods, advise a method, estimate memory."""
