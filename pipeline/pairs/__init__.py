"""Teacher pairs (x_T, x_0, label, seed), the student's training data: ``generate`` (per-seed noise through
the teacher's deterministic ODE into chunk-aligned shards of one store, resumable), ``importer`` (external
pairs in, the official per-pair format out), ``filter`` (the privacy filter and dedup of 2-D pairs: a new store
version holding the pairs that survive, with a count per reason) and ``filter_images`` (the same for image
pairs, streamed: copies of training images under shifts and flips, blocklisted images, exact and near
duplicates, with a calibration on the dataset's test split and a report)."""
