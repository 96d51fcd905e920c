"""The offline indexer: data sources and the dataset spec, training with TracIn checkpoints, the index job,
its Ray engine, and synthetic indexes for scale tests."""
