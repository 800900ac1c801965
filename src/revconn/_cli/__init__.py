"""The two executables, one module each, with their shared helpers."""
