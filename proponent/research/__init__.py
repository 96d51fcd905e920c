"""Research code kept for the benchmarks and their tests; the product does not import it (import-linter)."""
