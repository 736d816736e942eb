"""Training KDM students: ``train2d`` (the 2-D loop: Adam, EMA, resumable checkpoints, metrics JSONL),
``image_train`` (the image engine: bf16, CUDA graphs, DDP, the same run-directory layout), ``image_data``
(chunk-aware shuffled batches from a pair store, resumable and shardable) and ``torchrun`` (a ``kdm``
command in N processes from inside a stage). The KDM training pass itself lives in ``models/``."""
