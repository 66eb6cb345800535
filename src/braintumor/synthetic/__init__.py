"""Generated data: phantom slices and volumes (the demo's and the tests' data)."""
