"""Data: LUNA16 scans, synthetic scans, preprocessing into the HDF5 crops file, the input pipeline."""
