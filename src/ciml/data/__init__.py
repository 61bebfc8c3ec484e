"""Data: dataset layouts and readers, integrity checks, preprocessing, synthetic data and phantoms."""
