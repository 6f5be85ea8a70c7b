"""dockercomp agent package."""
