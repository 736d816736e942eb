"""Teacher pairs (x_T, x_0, label, seed), the student's training data: ``generate`` (per-seed noise through
the teacher's deterministic ODE into chunk-aligned shards of one store, resumable), ``importer`` (external
pairs in, the official per-pair format out) and ``filter`` (the privacy filter and dedup: a new store
version holding the pairs that survive, with a count per reason)."""
