"""Reports: results directories, per-layer tables, plots."""
