"""Explanations: a shape-by-shape walkthrough of a real forward pass, and plots of positions and attention."""
