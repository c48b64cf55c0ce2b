"""Benchmarks (``make bench``): they report ratios against a baseline, they do not assert."""
