"""Running recipes: checks before any work, building what a recipe describes, the stages, resume,
ablations and benchmarks."""
