"""DeepRecInfra: load generation, reports, simulation."""
