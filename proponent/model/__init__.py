"""Models and featurization: architectures, user plugins, checkpoints, objectives and their noise,
projections and sketches, featurizers (shared by the indexer and the query side)."""
