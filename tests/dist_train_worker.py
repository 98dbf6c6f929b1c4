"""Run by torchrun in test_train_distributed.py (not a test file): trains, then saves this
rank's weights and how many files it wrote."""
import os
import sys

import torch

from fastunet import train as train_cli
from fastunet.training import curves, evaluation, state

writes = []


def counting(fn):
    def wrapper(*args, **kwargs):
        writes.append(fn.__name__)
        return fn(*args, **kwargs)
    return wrapper


state.save_training_checkpoint = counting(state.save_training_checkpoint)
evaluation.write_png = counting(evaluation.write_png)
curves.write_png = counting(curves.write_png)

out_dir = sys.argv[1]
rank = int(os.environ["RANK"])
result = train_cli.train(train_cli.build_parser().parse_args(sys.argv[2:]))
torch.save({"state_dict": result.model.state_dict(), "writes": writes,
            "metrics": result.metrics}, os.path.join(out_dir, f"rank{rank}.pt"))
