"""`python -m phi3 ...` (and `torchrun ... -m phi3 train ...`) is the `phi3` command."""

from phi3.cli import _entry

if __name__ == "__main__":
    _entry()
