"""The static streaming page (index.html), shipped as package data and served by student.server."""
