"""Training datasets: an ImageFolder archive (``train|test/<class>/<file>``) prepared into a versioned
Zarr v3 group (``datasets``), the input of the image recipes' extractor and teacher stages."""
