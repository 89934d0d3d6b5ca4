"""A/B measurements behind the numbers in docs/: each compares two variants of one engine setting on the
same questions. Run from the repository root as `python -m scripts.NAME --help`."""
