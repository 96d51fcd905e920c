"""Answering: the one query use case, exact search, served features, scorings, self-influence, cross-loss."""
