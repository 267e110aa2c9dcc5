"""The planner: parameter counts, memory, compute and the RECIPES.md rules, turned into a recipe."""
