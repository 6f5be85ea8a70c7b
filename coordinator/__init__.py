"""dockercomp coordinator package."""
