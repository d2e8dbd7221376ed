"""Benchmarks (not tests): the engine against a faithful re-creation of the seed loop; see README.md."""
