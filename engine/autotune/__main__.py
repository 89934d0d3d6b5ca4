import sys

from engine.autotune.cli import main

sys.exit(main())
