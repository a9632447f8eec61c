"""imgconv boot."""
