"""``torchrun --nproc_per_node=N -m pfc.train [RECIPE] [--FIELD VALUE …]``: the trainer (:mod:`pfc.cli.train`)."""
import sys

from pfc.cli.train import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
