"""The training engine: one loop on accelerate (train.py) and the pieces it composes."""
