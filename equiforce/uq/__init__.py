"""Uncertainty that travels with the model: ensembles, a cheap single-model estimator, calibration.

A UQ model loads like any model file (``equiforce.load_model``) and is a potential to every caller,
with calibrated σ added to its outputs (see :mod:`equiforce.uq.keys`).
"""
