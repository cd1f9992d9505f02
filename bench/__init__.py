"""Side-by-side benchmarks: `python -m bench.<name>`; each prints a table and a final JSON line."""
