"""Embedded demo data sets and the `make demo` job."""
