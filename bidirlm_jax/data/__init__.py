"""Input pipelines (grain): token sources, per-process sharding, checkpointable iterators."""
