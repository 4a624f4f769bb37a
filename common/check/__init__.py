"""Checking: comparisons, reports, golden vectors, grading, and opening an offline run's files."""
