"""Pathfinder: the procedural generator (:mod:`.generator`), the datasets and shards
(:mod:`.dataset`, ``crbp-fast pathfinder``: :mod:`.data_cli`), the model (:mod:`.model`, with its
Gabor drive :mod:`.gabor`, loss :mod:`.losses`, metrics :mod:`.metrics` and published-checkpoint
reader :mod:`.published`), the trainer (:mod:`.train`, ``crbp-fast train``) and the diagnostics
(:mod:`.diagnose`, ``crbp-fast diagnose``). The public names are re-exported by
:mod:`crbp_fast.data` and :mod:`crbp_fast.models`."""
