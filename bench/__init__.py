"""faceberry benchmarks: one command each, a printed table and JSON under bench/results/."""
