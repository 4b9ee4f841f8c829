"""Textual front ends, the only package that imports textual: the image chat (`chat.py`, `chat_widgets.py`)
and the training dashboard (`dashboard.py`, `dashboard_widgets.py`). `text.py` holds plain line formatting that
the console view shares, so this file must stay import-free."""
