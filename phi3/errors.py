"""The one error type user-facing code raises: the CLI prints its message on one line and exits 2."""


class Phi3Error(Exception):
    """A problem with the user's input (path, file, config, prompt) that they can fix."""
