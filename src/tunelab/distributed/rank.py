"""One rank of a distributed run: `tunelab train` with the arguments the launcher left in TUNELAB_TRAIN_ARGS.

torchrun parses every option on its command line, the training script's too, and refuses `--run` (a prefix of
its own --run-path), so the train arguments travel in the environment (JSON) instead.
"""

import json
import os
import sys

from tunelab.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *json.loads(os.environ["TUNELAB_TRAIN_ARGS"])]))
