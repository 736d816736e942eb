"""Evaluating students: ``evaluate2d`` + ``metrics2d`` (2-D: in-cell fraction, sliced Wasserstein, outliers,
held-out pair MSE, plots), ``image_metrics`` (FD/KID on pinned features, FID/IS with the standard Inception
when present, student-vs-teacher MSE/LPIPS, grids), ``features`` (the offline feature extractor the pipeline
trains itself) and ``sample`` (one-step sampling from a finished student)."""
