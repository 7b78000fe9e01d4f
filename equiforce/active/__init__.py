"""Active learning: explore with MD → select uncertain, diverse structures → label with an oracle → retrain.

``equiforce learn CONFIG.yaml`` (see docs/active_learning.md); from Python, :func:`equiforce.active.loop.learn`.
"""
