"""The hierarchical parameter server: tiers of embedding rows, fastest first."""
