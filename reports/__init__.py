"""HTML reports and the blind side-by-side review server."""
