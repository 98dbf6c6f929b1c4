"""Check fastunet's model against the real mmseg 1.2.2, and (re)write the CI fixtures from it.

Runs only where mmseg is installed (not a fastunet dependency, not in CI), e.g. a scratch venv:

    python3 -m venv venv-mmseg && venv-mmseg/bin/pip install torch==2.13.0 \
        mmcv-lite==2.1.0 mmengine==0.10.7 mmsegmentation==1.2.2 ftfy regex
    venv-mmseg/bin/python tools/mmseg_parity.py                    # all checks
    venv-mmseg/bin/python tools/mmseg_parity.py --write-fixtures   # + tests/data/mmseg_*
    venv-mmseg/bin/python tools/mmseg_parity.py --small-slide      # quicker (~2 min)

Checks, for the 24 mmseg configs under ``mmseg/.mim/configs/unet/`` (norm_cfg set to plain BN):
  1. state_dict keys, order and shapes equal fastunet's (its config found by the mmseg file name),
     and the data/training recipe in fastunet's config equals mmseg's;
  2. per head (fcn/psp/aspp) with and without Dice: mmseg weights load into fastunet with
     ``load_state_dict(strict=True)``; ``encode_decode`` (eval), the training losses, gradients and
     BN running stats (train mode, dropout off) agree to 1e-4 relative. The Dice variants use
     the published (mmseg 0.x) Dice loss, registered into mmseg here as ``LegacyDiceLoss``,
     since mmseg 1.2's ``DiceLoss`` is a newer formula;
  3. an mmseg-layout checkpoint (meta with numpy values, message_hub with mmengine
     HistoryBuffers, optimizer, param_schedulers) loads through ``fastunet.load_checkpoint``;
  4. slide inference on a DRIVE-sized image (584x565, crop 64, stride 42) agrees.
Exit status 1 if any check fails.
"""
import argparse
import copy
import json
import logging
import os
import sys
import tempfile
import time
import types

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
FIXTURES = os.path.join(ROOT, "tests", "data")
RTOL = 1e-4


def _stub_mmcv_ops():
    # mmcv-lite has no compiled ops; mmseg imports some at module level but the UNet never uses them
    mod = types.ModuleType("mmcv.ops")

    def missing(name):
        if name.startswith("__"):
            raise AttributeError(name)

        def fail(*args, **kwargs):
            raise RuntimeError(f"mmcv.ops.{name} is stubbed (mmcv-lite)")
        return type(name, (), {"__init__": fail}) if name[:1].isupper() else fail

    mod.__getattr__ = missing
    sys.modules["mmcv.ops"] = mod


_stub_mmcv_ops()
import mmseg  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.logging import MessageHub, MMLogger  # noqa: E402
from mmengine.runner.checkpoint import save_checkpoint as mm_save_checkpoint  # noqa: E402
from mmengine.structures import PixelData  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402
from mmseg.structures import SegDataSample  # noqa: E402
from mmseg.utils import register_all_modules  # noqa: E402

import fastunet  # noqa: E402
from fastunet.models import apply_overrides, build_segmentor, get_config  # noqa: E402

register_all_modules()
MMLogger.get_current_instance().setLevel(logging.ERROR)  # init_weights logs every parameter
CONFIG_DIR = os.path.join(os.path.dirname(mmseg.__file__), ".mim", "configs", "unet")


@MODELS.register_module()
class LegacyDiceLoss(nn.Module):
    """The Dice loss of mmseg 0.x (behind the published ce-1.0-dice-3.0 numbers), for reference.

    Per image and class: 1 - (2 sum(p t valid) + smooth) / (sum(p^e + t^e) + smooth); the
    denominator runs over all pixels, ignored ones counting as the last class. Mean over images,
    then over classes.
    """

    def __init__(self, smooth=1, exponent=2, loss_weight=1.0, ignore_index=255,
                 loss_name="loss_dice", **kwargs):
        super().__init__()
        self.smooth, self.exponent, self.loss_weight = smooth, exponent, loss_weight
        self.ignore_index, self._loss_name = ignore_index, loss_name

    @property
    def loss_name(self):
        return self._loss_name

    def forward(self, pred, target, **kwargs):
        prob = F.softmax(pred, dim=1)
        num_classes = prob.shape[1]
        onehot = F.one_hot(target.long().clamp(0, num_classes - 1), num_classes)
        valid = (target != self.ignore_index).long().reshape(target.shape[0], -1)
        total = 0
        for c in range(num_classes):
            p = prob[:, c].reshape(prob.shape[0], -1)
            t = onehot[..., c].reshape(prob.shape[0], -1)
            num = (p * t * valid).sum(1) * 2 + self.smooth
            den = (p.pow(self.exponent) + t.pow(self.exponent)).sum(1) + self.smooth
            total = total + (1 - num / den).mean()
        return self.loss_weight * total / num_classes


# --------------------------------------------------------------------------------------------
# building both sides

def mm_files():
    """The 24 retinal-vessel config file names of mmseg 1.2.2 (cityscapes excluded)."""
    return sorted(f[:-3] for f in os.listdir(CONFIG_DIR)
                  if f.endswith(".py") and "cityscapes" not in f)


def _plain_bn(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "norm_cfg" and isinstance(v, dict) and v.get("type") == "SyncBN":
                v["type"] = "BN"
            else:
                _plain_bn(v)
    elif isinstance(node, (list, tuple)):
        for v in node:
            _plain_bn(v)


def mm_config(file_name):
    cfg = Config.fromfile(os.path.join(CONFIG_DIR, file_name + ".py"))
    _plain_bn(cfg.model)
    return cfg


def _legacy_dice(model_cfg):
    losses = model_cfg.decode_head.loss_decode
    if isinstance(losses, (list, tuple)):
        for c in losses:
            if c["type"] == "DiceLoss":
                c["type"] = "LegacyDiceLoss"


def _ce_non_ignore(model_cfg):
    for head in (model_cfg.decode_head, model_cfg.auxiliary_head):
        losses = head.loss_decode
        for c in losses if isinstance(losses, (list, tuple)) else [losses]:
            if c["type"] == "CrossEntropyLoss":
                c["avg_non_ignore"] = True


def mm_build(model_cfg, seed):
    model_cfg = copy.deepcopy(model_cfg)
    model_cfg.pop("data_preprocessor", None)  # inputs are normalised already
    torch.manual_seed(seed)
    model = MODELS.build(model_cfg)
    model.init_weights()
    return model


def small_overrides(base_channels=2):
    """fastunet overrides for a tiny model of the same structure (for the CI fixtures)."""
    return [f"model.backbone.base_channels={base_channels}",
            f"model.decode_head.in_channels={base_channels}", "model.decode_head.channels=4",
            f"model.auxiliary_head.in_channels={2 * base_channels}",
            "model.auxiliary_head.channels=4"]


def _mm_small(model_cfg, base_channels=2):
    model_cfg.backbone.base_channels = base_channels
    model_cfg.decode_head.in_channels = base_channels
    model_cfg.decode_head.channels = 4
    model_cfg.auxiliary_head.in_channels = 2 * base_channels
    model_cfg.auxiliary_head.channels = 4


# --------------------------------------------------------------------------------------------
# comparisons

class Report:
    def __init__(self):
        self.failures = []

    def check(self, ok, what):
        print(("  ok    " if ok else "  FAIL  ") + what, flush=True)
        if not ok:
            self.failures.append(what)

    def close(self, a, b, what):
        a, b = a.detach().double(), b.detach().double()
        if a.shape != b.shape:
            return self.check(False, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
        err = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-12)
        self.check(err <= RTOL, f"{what}: max rel err {err:.2e}")
        return err


def key_shapes(model):
    return [(k, list(v.shape)) for k, v in model.state_dict().items()]


def samples(label):
    return [SegDataSample(gt_sem_seg=PixelData(data=lab[None])) for lab in label]


def mm_metas(x):
    shape = tuple(x.shape[2:])
    return [dict(ori_shape=shape, img_shape=shape, pad_shape=shape, padding_size=[0, 0, 0, 0])
            for _ in range(x.shape[0])]


def _train_no_dropout(model):
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout2d):
            m.eval()


def mm_losses(model, x, label):
    out = model.loss(x, samples(label))
    return {k: v for k, v in out.items() if "loss" in k}


def losses_and_grads(model, fn):
    model.zero_grad()
    losses = fn()
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


def compare_pair(rep, tag, mm, fu, x, label, label_ignore):
    """encode_decode, losses, grads and BN stats of an mmseg model and a fastunet copy of it."""
    mm.eval(), fu.eval()
    with torch.no_grad():
        rep.close(fu.encode_decode(x), mm.encode_decode(x, mm_metas(x)), f"{tag} encode_decode")
    for lab_tag, lab in (("labels", label), ("labels with 255", label_ignore)):
        if lab is None:
            continue
        _train_no_dropout(mm), _train_no_dropout(fu)
        mm_l, mm_g = losses_and_grads(mm, lambda: mm_losses(mm, x, lab))
        fu_l, fu_g = losses_and_grads(fu, lambda: fu.loss(x, lab))
        rep.check(sorted(mm_l) == sorted(fu_l), f"{tag} loss keys {sorted(fu_l)} ({lab_tag})")
        for k in fu_l:
            if k in mm_l:
                rep.close(fu_l[k], mm_l[k], f"{tag} {k}={fu_l[k].item():.6f} ({lab_tag})")
        worst = max(((fu_g[n] - mm_g[n]).abs().max() / mm_g[n].abs().max().clamp_min(1e-12)).item()
                    for n in mm_g)
        rep.check(sorted(mm_g) == sorted(fu_g) and worst <= RTOL,
                  f"{tag} gradients of {len(mm_g)} parameters: max rel err {worst:.2e} ({lab_tag})")
    fs, ms = fu.state_dict(), mm.state_dict()
    worst = max(((fs[k].double() - ms[k].double()).abs().max()
                 / ms[k].double().abs().max().clamp_min(1e-12)).item() for k in ms)
    rep.check(worst <= RTOL, f"{tag} BN running stats after the train steps: max rel err "
                             f"{worst:.2e}")


def make_inputs(seed, n, h, w):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, h, w, generator=g)
    label = (torch.rand(n, h, w, generator=g) < 0.3).long()
    label_ignore = label.clone()
    label_ignore[torch.rand(n, h, w, generator=g) < 0.2] = 255
    return x, label, label_ignore


# --------------------------------------------------------------------------------------------
# checks

RECIPE = {  # fastunet config path -> how to read the same value from the mmseg config
    "data.img_scale": lambda c: tuple(c.img_scale),
    "data.crop_size": lambda c: tuple(c.crop_size),
    "data.ratio_range": lambda c: tuple(c.train_pipeline[2]["ratio_range"]),
    "data.cat_max_ratio": lambda c: c.train_pipeline[3]["cat_max_ratio"],
    "data.flip_prob": lambda c: c.train_pipeline[4]["prob"],
    "data.mean": lambda c: tuple(c.data_preprocessor["mean"]),
    "data.std": lambda c: tuple(c.data_preprocessor["std"]),
    "data.seg_pad_val": lambda c: c.data_preprocessor["seg_pad_val"],
    "data.pad_val": lambda c: c.data_preprocessor["pad_val"],
    "model.test_cfg": lambda c: dict(mode=c.model.test_cfg["mode"],
                                     crop_size=tuple(c.model.test_cfg["crop_size"]),
                                     stride=tuple(c.model.test_cfg["stride"])),
    "train.batch_size": lambda c: c.train_dataloader["batch_size"] * 4,  # 4 GPUs
    "train.lr": lambda c: c.optimizer["lr"],
    "train.momentum": lambda c: c.optimizer["momentum"],
    "train.weight_decay": lambda c: c.optimizer["weight_decay"],
    "train.min_lr": lambda c: c.param_scheduler[0]["eta_min"],
    "train.power": lambda c: c.param_scheduler[0]["power"],
    "train.max_iters": lambda c: c.train_cfg["max_iters"],
    "train.eval_interval": lambda c: c.train_cfg["val_interval"],
    "train.checkpoint_interval": lambda c: c.default_hooks["checkpoint"]["interval"],
}


def _get(cfg, path):
    for k in path.split("."):
        cfg = cfg[k]
    return cfg


def _loss_spec(head_cfg):
    losses = head_cfg["loss_decode"]
    losses = losses if isinstance(losses, (list, tuple)) else [losses]
    return sorted((c.get("loss_name", "loss_ce" if c["type"] == "CrossEntropyLoss" else
                         "loss_dice"), c["type"], c["loss_weight"]) for c in losses)


def check_configs(rep):
    print("1. state_dict keys/shapes/order and recipe, all 24 mmseg configs", flush=True)
    keys_by_head = {}
    for name in mm_files():
        mcfg = mm_config(name)
        fcfg = get_config(name)
        mm = mm_build(mcfg.model, 0)
        with torch.device("meta"):
            fu = build_segmentor(fcfg)
        mk, fk = key_shapes(mm), key_shapes(fu)
        head = fcfg["model"]["decode_head"]["type"]
        keys_by_head.setdefault(head, mk)
        rep.check(mk == fk and keys_by_head[head] == mk,
                  f"{name} -> {fcfg['name']}: {len(mk)} keys equal in order and shape")
        bad = [p for p, get in RECIPE.items() if _get(fcfg, p) != get(mcfg)]
        heads_ok = all(
            _loss_spec(fcfg["model"][h]) == _loss_spec(mcfg.model[h]) and
            {k: v for k, v in fcfg["model"][h].items() if k not in ("loss_decode", "norm_cfg")} ==
            {k: (tuple(v) if isinstance(v, list) else v) for k, v in mcfg.model[h].items()
             if k not in ("loss_decode", "norm_cfg")}
            for h in ("decode_head", "auxiliary_head"))
        backbone_ok = ({k: v for k, v in fcfg["model"]["backbone"].items() if k != "norm_cfg"} ==
                       {k: v for k, v in mcfg.model.backbone.items() if k != "norm_cfg"})
        rep.check(not bad and heads_ok and backbone_ok,
                  f"{name}: backbone/head settings, losses and recipe equal mmseg's"
                  + (f" (differs: {bad})" if bad else ""))
        del mm
    n_params = sum(p.numel() for p in build_segmentor(get_config(
        "fcn_unet_s5-d16_64x64_40k_drive")).backbone.parameters())
    rep.check(n_params == 28949568, f"backbone parameters {n_params:,}")
    return keys_by_head


def check_numerics(rep):
    print("2. numerics per head, full-size models (64x64 input, batch 2)", flush=True)
    x, label, label_ignore = make_inputs(1, 2, 64, 64)
    for name in ("unet-s5-d16_fcn_4xb4-40k_drive-64x64",
                 "unet-s5-d16_pspnet_4xb4-40k_drive-64x64",
                 "unet-s5-d16_deeplabv3_4xb4-40k_drive-64x64",
                 "unet-s5-d16_fcn_4xb4-ce-1.0-dice-3.0-40k_drive-64x64",
                 "unet-s5-d16_pspnet_4xb4-ce-1.0-dice-3.0-40k_drive-64x64",
                 "unet-s5-d16_deeplabv3_4xb4-ce-1.0-dice-3.0-40k_drive-64x64"):
        mcfg = mm_config(name)
        _legacy_dice(mcfg.model)
        mm = mm_build(mcfg.model, 0)
        fu = build_segmentor(get_config(name))
        fu.load_state_dict(mm.state_dict(), strict=True)
        tag = name.split("_")[1] + ("+dice" if "dice" in name else "")
        # mmseg's default CE averages over all pixels: identical when no label is 255
        compare_pair(rep, tag, mm, fu, x, label, None)
        if "dice" not in name:  # labels with 255: fastunet's CE = mmseg's avg_non_ignore=True
            _ce_non_ignore(mcfg.model)
            mm2 = mm_build(mcfg.model, 0)
            fu.load_state_dict(mm2.state_dict(), strict=True)
            compare_pair(rep, tag + " (avg_non_ignore)", mm2, fu, x, None, label_ignore)


def mm_style_checkpoint(mm, model_cfg_text="", optimizer=True):
    """A checkpoint dict as mmengine's Runner.save_checkpoint writes it."""
    hub = MessageHub.get_instance(f"parity-{time.time()}")
    for it in range(3):
        hub.update_scalar("train/loss", 0.5 - 0.1 * it)
        hub.update_scalar("train/lr", 0.01)
    hub.update_info("iter", 4000)
    meta = dict(cfg=model_cfg_text, seed=np.int64(42), experiment_name="parity",
                time=time.strftime("%Y%m%d_%H%M%S"), mmengine_version="0.10.7", epoch=0,
                iter=4000, dataset_meta=dict(classes=("background", "vessel"),
                                             palette=[[120, 120, 120], [6, 230, 230]]),
                best_score=np.float64(0.7867), mean=np.array([123.675, 116.28, 103.53]))
    ckpt = dict(meta=meta, state_dict={k: v.cpu() for k, v in mm.state_dict().items()},
                message_hub=hub.state_dict())
    if optimizer:
        # param_groups only: momentum buffers would double the fixture size for no extra check
        opt = torch.optim.SGD(mm.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        ckpt["optimizer"] = opt.state_dict()
        ckpt["param_schedulers"] = [dict(eta_min=1e-4, power=0.9, begin=0, end=40000,
                                         last_step=4000, by_epoch=False,
                                         _get_lr_called_within_step=False)]
    return ckpt


def check_checkpoint(rep):
    print("3. mmseg-layout checkpoint through fastunet.load_checkpoint", flush=True)
    name = "unet-s5-d16_pspnet_4xb4-40k_stare-128x128"
    mcfg = mm_config(name)
    mm = mm_build(mcfg.model, 3)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "iter_4000.pth")
        mm_save_checkpoint(mm_style_checkpoint(mm, mcfg.pretty_text), path)
        fu = build_segmentor(get_config(name))
        meta = fastunet.load_checkpoint(fu, path)
        same = all(torch.equal(fu.state_dict()[k], v) for k, v in mm.state_dict().items())
        rep.check(same and meta["iter"] == 4000 and meta["seed"] == 42,
                  f"{name}: load_checkpoint(strict) restores every tensor; meta iter/seed read")
        # a bare state_dict saved from DDP ('module.' prefix) loads too
        torch.save({f"module.{k}": v for k, v in mm.state_dict().items()}, path)
        fu2 = build_segmentor(get_config(name))
        fastunet.load_checkpoint(fu2, path)
        rep.check(all(torch.equal(fu2.state_dict()[k], v) for k, v in mm.state_dict().items()),
                  "bare 'module.'-prefixed state_dict loads")


def check_slide(rep, full):
    print("4. slide inference, DRIVE-sized image 584x565, crop 64, stride 42", flush=True)
    name = "unet-s5-d16_fcn_4xb4-40k_drive-64x64"
    mcfg = mm_config(name)
    fcfg = get_config(name)
    if not full:
        _mm_small(mcfg.model)
        apply_overrides(fcfg, small_overrides())
    mm = mm_build(mcfg.model, 5)
    fu = build_segmentor(fcfg)
    fu.load_state_dict(mm.state_dict(), strict=True)
    mm.eval(), fu.eval()
    x = torch.randn(1, 3, 584, 565, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        t0 = time.perf_counter()
        ref = mm.inference(x, mm_metas(x))
        t1 = time.perf_counter()
        out = fu.inference(x)
        t2 = time.perf_counter()
    rep.close(out, ref, f"slide logits ({'full' if full else 'base_channels=2'} model; mmseg "
                        f"{t1 - t0:.1f} s, fastunet {t2 - t1:.1f} s)")
    agree = (out.argmax(1) == ref.argmax(1)).double().mean().item()
    rep.check(agree == 1.0, f"slide labels agree on {agree * 100:.4f}% of pixels")


# --------------------------------------------------------------------------------------------
# fixtures for CI (tests/data)

# tag -> (mmseg config, base_channels); the file sizes stay small (CI fixtures, < 0.5 MB in all)
FIXTURE_MODELS = {"fcn": ("unet-s5-d16_fcn_4xb4-40k_drive-64x64", 2),
                  "psp": ("unet-s5-d16_pspnet_4xb4-40k_drive-64x64", 1),
                  "aspp": ("unet-s5-d16_deeplabv3_4xb4-40k_drive-64x64", 1)}
GRAD_KEYS = ["backbone.encoder.0.0.convs.0.conv.weight",
             "backbone.decoder.0.upsample.interp_upsample.1.conv.weight",
             "decode_head.conv_seg.weight", "decode_head.conv_seg.bias",
             "auxiliary_head.convs.0.conv.weight"]


def write_fixtures(rep, keys_by_head):
    print("5. writing fixtures to tests/data", flush=True)
    os.makedirs(FIXTURES, exist_ok=True)
    keys = {"FCNHead": keys_by_head["FCNHead"], "PSPHead": keys_by_head["PSPHead"],
            "ASPPHead": keys_by_head["ASPPHead"]}
    with open(os.path.join(FIXTURES, "mmseg_state_dict_keys.json"), "w") as f:
        json.dump({"source": "mmsegmentation 1.2.2 EncoderDecoder.state_dict(), configs/unet",
                   "keys": {h: [[k, s] for k, s in v] for h, v in keys.items()}}, f)
    x, label, label_ignore = make_inputs(11, 2, 32, 32)
    # slide: image larger than the crop with a shifted last window, and one lower than the crop
    slides = [torch.randn(1, 3, 40, 56, generator=torch.Generator().manual_seed(12)),
              torch.randn(1, 3, 16, 80, generator=torch.Generator().manual_seed(13))]
    # inputs are stored as float16 (half the bytes); the models see them upcast to float32
    x, slides = x.half().float(), [s.half().float() for s in slides]
    expected = {"source": "mmsegmentation 1.2.2 (tools/mmseg_parity.py --write-fixtures)",
                "x": x.half(), "label": label.to(torch.uint8),
                "label_ignore": label_ignore.to(torch.uint8),
                "slide_inputs": [s.half() for s in slides], "slide_crop": (32, 32),
                "slide_stride": (21, 21),
                "grad_keys": GRAD_KEYS, "models": {}}
    for i, (tag, (name, base)) in enumerate(FIXTURE_MODELS.items()):
        mcfg = mm_config(name)
        _mm_small(mcfg.model, base)
        mm = mm_build(mcfg.model, 100 + i)
        path = os.path.join(FIXTURES, f"mmseg_unet_bc{base}_{tag}.pt")
        mm_save_checkpoint(mm_style_checkpoint(mm, mcfg.pretty_text[:2000]), path)
        rec = {"config": name, "overrides": small_overrides(base),
               "checkpoint": os.path.basename(path)}
        mm.eval()
        with torch.no_grad():
            rec["encode_decode"] = mm.encode_decode(x, mm_metas(x))
            if tag == "fcn":  # the slide loop does not depend on the head
                mm.test_cfg.crop_size, mm.test_cfg.stride = (32, 32), (21, 21)
                rec["slide"] = [mm.inference(s, mm_metas(s)) for s in slides]
        # losses and gradients in train mode (BN batch statistics), dropout off for determinism
        for variant, lab, edit in (("ce", label, None), ("ce_ignore", label_ignore, _ce_non_ignore),
                                   ("dice", label, "dice")):
            vcfg = copy.deepcopy(mcfg)
            if edit == "dice":
                vcfg.model.decode_head.loss_decode = [
                    dict(type="CrossEntropyLoss", loss_name="loss_ce", loss_weight=1.0),
                    dict(type="LegacyDiceLoss", loss_name="loss_dice", loss_weight=3.0)]
            elif edit is not None:
                edit(vcfg.model)
            mv = mm_build(vcfg.model, 0)
            mv.load_state_dict(mm.state_dict())
            _train_no_dropout(mv)
            losses, grads = losses_and_grads(mv, lambda: mm_losses(mv, x, lab))
            rec[variant] = {"losses": {k: v.item() for k, v in losses.items()},
                            "grads": torch.cat([grads[k].flatten() for k in GRAD_KEYS]),
                            "running_mean": torch.cat([v.flatten() for k, v in
                                                       mv.state_dict().items()
                                                       if k.endswith("running_mean")])}
        expected["models"][tag] = rec
        # self-check: the fixture reproduces with fastunet
        fu = build_segmentor(apply_overrides(get_config(name), rec["overrides"]))
        fastunet.load_checkpoint(fu, path)
        fu.eval()
        with torch.no_grad():
            rep.close(fu.encode_decode(x), rec["encode_decode"], f"fixture {tag} encode_decode")
    torch.save(expected, os.path.join(FIXTURES, "mmseg_expected.pt"))
    sizes = {f: os.path.getsize(os.path.join(FIXTURES, f)) for f in sorted(os.listdir(FIXTURES))
             if f.startswith("mmseg_")}
    print("  fixtures: " + ", ".join(f"{f} {s / 1024:.0f} KiB" for f, s in sizes.items())
          + f"; total {sum(sizes.values()) / 1024:.0f} KiB")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write-fixtures", action="store_true",
                        help="also regenerate tests/data/mmseg_* from mmseg")
    parser.add_argument("--small-slide", action="store_true",
                        help="slide check with base_channels=2 instead of the full model (faster)")
    parser.add_argument("--fixtures-only", action="store_true",
                        help="only the key check (1) and the fixtures (5)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    print(f"mmseg {mmseg.__version__}, torch {torch.__version__}, fastunet {fastunet.__version__}")
    rep = Report()
    t0 = time.time()
    keys_by_head = check_configs(rep)
    if not args.fixtures_only:
        check_numerics(rep)
        check_checkpoint(rep)
        check_slide(rep, full=not args.small_slide)
    if args.write_fixtures or args.fixtures_only:
        write_fixtures(rep, keys_by_head)
    print(f"{len(rep.failures)} failed ({time.time() - t0:.0f} s)")
    for f in rep.failures:
        print("  FAILED: " + f)
    return 1 if rep.failures else 0


if __name__ == "__main__":
    sys.exit(main())
