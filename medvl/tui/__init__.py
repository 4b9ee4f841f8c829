"""Textual apps: the training dashboard (dashboard.py) and the image chat."""
