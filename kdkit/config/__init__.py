"""Recipes: the typed schema, loading YAML with overrides, the checks, and the plan each run follows."""
