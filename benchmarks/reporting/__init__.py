"""The pieces of benchmarks/report.py: reading results folders (results), number formatting
(format), the README's tables (tables) and the issues' targets against what was measured
(targets)."""
