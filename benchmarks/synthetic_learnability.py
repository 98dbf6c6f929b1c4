"""Is the synthetic data set learnable? Green-channel baseline vs a small CNN trained briefly.

    python benchmarks/synthetic_learnability.py [SECONDS]     (env: LC_N images per split,
                                                                LC_W loader workers, LC_C width)

Generates LC_N (20) training and validation images, scores the green-channel baseline, trains a
small stand-in U-Net (defined here: data code does not import fastunet.models) with fastunet's
training pipeline on 64x64 crops for SECONDS, and scores it on the validation images (FOV,
SegMetric). Writes learn_check.json to $OUT (or the current folder). Uses CUDA when available.
"""
import json
import multiprocessing as mp
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastunet.data import (EpochSampler, TrainDataset, TrainTransform, green_channel_baseline,
                           synthetic)
from fastunet.data.transforms import normalize
from fastunet.metrics import SegMetric


def gen(args):
    return synthetic.generate(*args)


def blk(i, o):
    conv = lambda a: [nn.Conv2d(a, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(True)]
    return nn.Sequential(*conv(i), *conv(o))


class UNet(nn.Module):
    def __init__(s, c=32):
        super().__init__()
        s.enc = nn.ModuleList([blk(3, c), blk(c, 2 * c), blk(2 * c, 4 * c), blk(4 * c, 8 * c),
                               blk(8 * c, 16 * c)])
        s.dec = nn.ModuleList([blk(24 * c, 8 * c), blk(12 * c, 4 * c), blk(6 * c, 2 * c),
                               blk(3 * c, c)])
        s.out = nn.Conv2d(c, 2, 1)

    def forward(s, x):
        skips = []
        for k, e in enumerate(s.enc):
            x = e(x if k == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for d, sk in zip(s.dec, reversed(skips[:-1])):
            x = d(torch.cat([sk, F.interpolate(x, size=sk.shape[-2:], mode="bilinear")], 1))
        return s.out(x)


class Items(torch.utils.data.Dataset):
    def __init__(s, items):
        s.items = items

    def __len__(s):
        return len(s.items)

    def __getitem__(s, i):
        return s.items[i]


def main():
    budget = float(sys.argv[1]) if len(sys.argv) > 1 else 150
    out = os.environ.get("OUT", ".")
    t0 = time.time()
    n = int(os.environ.get("LC_N", 20))
    with mp.Pool(min(14, os.cpu_count() or 1)) as pool:
        tr = pool.map(gen, [(0, "training", i) for i in range(n)])
        va = pool.map(gen, [(0, "validation", i) for i in range(n)])
    print(f"generated {2 * n} images in {time.time() - t0:.1f}s", flush=True)
    base = green_channel_baseline(tr, va)
    print("green baseline vessel dice", round(base["metrics"]["vessel_dice"], 2), flush=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    net = UNet(int(os.environ.get("LC_C", 32))).to(dev).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=1e-4)
    ds = TrainDataset(Items(tr), TrainTransform((64, 64), (584, 565)), seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=32, sampler=EpochSampler(len(ds)),
                                         num_workers=int(os.environ.get("LC_W", 12)),
                                         persistent_workers=True,
                                         prefetch_factor=8)
    it, t1 = 0, time.time()
    history = []
    for x, y in loader:
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss = F.cross_entropy(net(x), y, ignore_index=255)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        it += 1
        if it % 500 == 0:
            history.append((it, round(time.time() - t1, 1), round(loss.item(), 4)))
            print(history[-1], flush=True)
        if time.time() - t1 > budget:
            break
    net.eval()
    m = SegMetric()
    with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16):
        for v in va:
            x = normalize(v["img"])[None].to(dev)
            H, W = x.shape[-2:]
            xp = F.pad(x, (0, (-W) % 16, 0, (-H) % 16))
            pred = net(xp)[..., :H, :W].argmax(1)[0].cpu().numpy()
            m.update(pred, v["label"], fov=v["fov"])
    res = dict(iterations=it, train_seconds=round(time.time() - t1, 1),
               baseline=base["metrics"]["vessel_dice"], baseline_threshold=base["threshold"],
               cnn=m.compute(), history=history,
               device=torch.cuda.get_device_name(0) if dev == "cuda" else "cpu")
    print(json.dumps(res, indent=1), flush=True)
    print(m.table())
    with open(os.path.join(out, "learn_check.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
