"""Tasks on which the method is validated (Pathfinder; the panoptic FPN)."""
