"""dockercomp installer package."""
