"""CT scans on disk: the LUNA16 layout and CSVs, .mhd / NIfTI / DICOM reading and checks, world mm
<-> voxel geometry, converters and synthetic LUNA16-format scans. No JAX is imported here."""
