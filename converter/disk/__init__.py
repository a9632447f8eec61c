"""imgconv disk."""
