"""Evaluation: generation-based accuracy now; cloze, bits per byte and ORM scores build on it."""
