"""Studies over many runs: `compare` runs a comparison's entries (grids, seeds, resumable) and
`report` turns finished runs into tables and plots. Neither is needed to train or deploy."""
