"""
``python -m kelpie_sdk.worker``: run the worker agent.
"""

from __future__ import annotations

import sys

from kelpie_sdk.worker._main import main

if __name__ == "__main__":
    sys.exit(main())
