"""Where text and problems come from.

synthetic  the embedded default data: a seeded mini-internet (encyclopedia with held-out and
           repeated entities, GSM8K-style math, arithmetic, spelling) plus its ground truth.
readers    real sources: text files, jsonl, FineWeb-style parquet shards, GSM8K.
pipeline   grain: documents -> tokens -> packed rows -> batches, sharded per JAX process,
           with a JSON-serializable iterator state for checkpoints.
"""
