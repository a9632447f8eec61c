"""imgconv oci."""
