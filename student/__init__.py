"""student package."""
