"""Storage behind one interface, at any fsspec URL (a local path or ``s3://bucket/prefix``): ``artifacts``
(content-addressed artifact directories written under ``<uri>.partial`` and committed with their manifest
last; JSON, hashing), ``pairstore`` (Zarr v3 pair stores: layout from ``storage_schemas.pairs``, sized once,
whole-chunk writes), ``checkpoints`` (atomic, resumable training checkpoints and the metrics log) and
``run_mirror`` (a local run directory mirrored to object storage). Nothing here knows about stages."""
