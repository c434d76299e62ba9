"""`python -m qwenvl.finetune --model M --data train.json --output DIR [...]`."""

import sys

from .cli import main

sys.exit(main())
