"""Training datasets: by name (``sources``: an explicit archive, else ``$KDM_DATA_DIR``, else a checked
download into it) and an ImageFolder archive or CIFAR-10's python release prepared into a versioned Zarr v3
group (``datasets``), the input of the image recipes' extractor and teacher stages."""
