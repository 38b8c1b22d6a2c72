"""``python -m labelstudio_maskclip``: the command line (also under torchrun, e.g.
``torchrun --nproc_per_node 4 -m labelstudio_maskclip preannotate --project 1``)."""

import sys

from .cli import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main())
