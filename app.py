"""The lora-composer web UI: ``python app.py [--model DIR_OR_ID] [--library DIR] [--host H] [--port P]``.

Same as ``compose ui``; the app itself lives in :mod:`lora_composer.frontends.ui`.
"""

import sys

from lora_composer.frontends.ui import main

if __name__ == "__main__":
    sys.exit(main())
