"""Training-pipeline throughput (samples/s) and synthetic-image generation time.

    pytest benchmarks/bench_data.py --benchmark-only

DRIVE-size inputs (584 x 565 synthetic fundus images, decoded once and kept in memory as
TrainDataset does), DRIVE's img_scale, 64x64 and 256x256 crops; one process, and a DataLoader
with 2 worker processes (batch 16). samples/s is in each benchmark's extra_info.
"""
import itertools

import pytest
import torch

from fastunet.data import EpochSampler, SyntheticVessels, TrainDataset, TrainTransform
from fastunet.data import synthetic

N_IMAGES = 4
SAMPLES = 256


@pytest.fixture(scope="module")
def images():
    ds = SyntheticVessels("training", num_images=N_IMAGES, cache=False)
    return [ds[i] for i in range(N_IMAGES)]


class _InMemory(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _train_set(items, crop):
    return TrainDataset(_InMemory(items), TrainTransform((crop, crop), (584, 565)), seed=0)


@pytest.mark.parametrize("crop", [64, 256])
def test_pipeline_one_process(benchmark, images, crop):
    ds = _train_set(images, crop)
    keys = list(itertools.islice(iter(EpochSampler(len(ds), seed=0)), SAMPLES))

    def run():
        for k in keys:
            ds[k]

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    benchmark.extra_info["samples_per_s"] = SAMPLES / benchmark.stats.stats.min


@pytest.mark.parametrize("crop", [64, 256])
def test_pipeline_dataloader_2_workers(benchmark, images, crop):
    ds = _train_set(images, crop)
    batch = 16
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=2,
                                         sampler=EpochSampler(len(ds), seed=0),
                                         persistent_workers=True, prefetch_factor=4)
    it = iter(loader)
    next(it)  # workers started and warm

    def run():
        for _ in range(SAMPLES // batch):
            next(it)

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    benchmark.extra_info["samples_per_s"] = SAMPLES / benchmark.stats.stats.min


def test_synthetic_generation_drive_size(benchmark):
    counter = itertools.count()
    benchmark.pedantic(lambda: synthetic.generate(0, "training", next(counter)), rounds=5,
                       warmup_rounds=1)
    benchmark.extra_info["seconds_per_image"] = benchmark.stats.stats.mean
