"""dockercomp broker package."""
