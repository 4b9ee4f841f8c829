"""Textual front ends (the only package that imports textual): the chat app (`chat.py`, `chat_widgets.py`).
One stylesheet for all of them: `medvl.tcss`."""
