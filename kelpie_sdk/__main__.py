"""
``python -m kelpie_sdk`` runs the ``kelpie`` command.
"""

from kelpie_sdk.cli import run

if __name__ == "__main__":
    run()
