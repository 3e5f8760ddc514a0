import sys

from duat_kernels.cli import main

sys.exit(main())
