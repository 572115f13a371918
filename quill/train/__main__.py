import sys

from quill.train.cli import main

sys.exit(main())
