"""Small native kernels for CPU steps (C, built once per machine by native.py)."""
