import sys

from lora_scripts.cli import main

sys.exit(main())
