"""The planner: parameter counts, memory, compute and the rules of docs/rules.md, turned into a recipe."""
