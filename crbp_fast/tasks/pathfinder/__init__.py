"""The Pathfinder contour-tracing task: the Figure 1 reproduction (``crbp-fast figure1``)."""
