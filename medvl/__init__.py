"""medvl: build medical vision-language models from the terminal.

Importing this package must stay cheap: no torch, transformers or textual here (the CLI's --help and shell
completion import it on every keypress).
"""

__version__ = "0.1.0"
