"""Training: the pieces a training loop applies to phi3.model.Transformer from outside
(activation checkpointing and, later, data/fully-sharded parallelism in `parallel`)."""
