"""Training stage: data preparation (data.py) and the step functions and loop that run a recipe."""
