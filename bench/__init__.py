"""Speed benchmarks of the suite's own machinery, each measured against a plain baseline in the same run.

    python -m bench.language      # or: make bench

See bench/README.md for what is measured, why, and the figures measured so far.
"""
