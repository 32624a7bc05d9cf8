"""``python -m lora_composer ...`` is ``compose ...``."""

import sys

from lora_composer.frontends.cli import main

sys.exit(main())
