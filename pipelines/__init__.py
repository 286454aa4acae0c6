"""Ray jobs as library functions with typed configs. No argv, no YAML here
except in :mod:`pipelines.params`, the one place params.yaml is parsed."""
