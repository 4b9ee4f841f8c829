"""medvl: build medical vision-language models from the terminal.

Importing this package must stay cheap: no torch, transformers or textual here (the CLI's --help and shell
completion import it on every keypress). `from medvl import Chatbot` loads medvl.inference on first use.
"""

__version__ = "0.1.0"
__all__ = ["Chatbot", "__version__"]


def __getattr__(name: str):
    if name == "Chatbot":
        from medvl.inference import Chatbot

        return Chatbot
    raise AttributeError(f"module 'medvl' has no attribute {name!r}")
