"""Named configs: the 24 published UNet-S5-D16 configs (+ mmseg 1.x aliases) and ``synthetic``.

A config is a plain nested dict (print it, copy it, edit it)::

    {'name': ...,
     'model': {'backbone': {...}, 'decode_head': {...}, 'auxiliary_head': {...},
               'test_cfg': {'mode': 'slide', 'crop_size': (h, w), 'stride': (h, w)}},
     'data': {'dataset', 'data_root', 'img_scale', 'crop_size', 'ratio_range', ...},
     'train': {'max_iters', 'batch_size', 'lr', 'momentum', 'weight_decay', 'min_lr', 'power',
               'eval_interval', 'checkpoint_interval'}}

``model`` uses mmseg's keys and values, so ``build_segmentor`` also accepts an mmseg model dict.
:func:`get_config` also reads config files (YAML/JSON, mmseg ``.py``): see
:mod:`fastunet.models.config_files`.
"""
import ast
import copy
import difflib
import os

__all__ = ["get_config", "list_configs", "list_aliases", "resolve_name", "apply_overrides",
           "ConfigKeyError"]


class ConfigKeyError(KeyError):
    """Unknown config name or key (a KeyError whose message prints without quotes)."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)

# SyncBN in mmseg's files; plain BN here (a distributed trainer converts it to SyncBN)
_NORM = {"type": "BN", "requires_grad": True}

# dataset -> (name in config names, mmseg 1.x suffix, mmseg img_scale, image HxW, crop, stride,
#             train/val image counts)
_DATASETS = {
    "drive": ("64x64_40k_drive", "drive-64x64", "DRIVE", (584, 565), (584, 565), 64, 42, 20, 20),
    "stare": ("128x128_40k_stare", "stare-128x128", "STARE", (605, 700), (605, 700), 128, 85,
              10, 10),
    "chase_db1": ("128x128_40k_chase_db1", "chase-db1-128x128", "CHASE_DB1", (960, 999),
                  (960, 999), 128, 85, 20, 8),
    "hrf": ("256x256_40k_hrf", "hrf-256x256", "HRF", (2336, 3504), (2336, 3504), 256, 170, 15, 30),
}
_HEADS = ("fcn", "pspnet", "deeplabv3")


def _loss(weight, dice=False):
    ce = {"type": "CrossEntropyLoss", "use_sigmoid": False, "loss_weight": weight}
    if not dice:
        return ce
    return [{"type": "CrossEntropyLoss", "loss_name": "loss_ce", "loss_weight": 1.0},
            {"type": "DiceLoss", "loss_name": "loss_dice", "loss_weight": 3.0}]


def _backbone(base_channels=64):
    return {"type": "UNet", "in_channels": 3, "base_channels": base_channels, "num_stages": 5,
            "strides": (1, 1, 1, 1, 1), "enc_num_convs": (2, 2, 2, 2, 2),
            "dec_num_convs": (2, 2, 2, 2), "downsamples": (True, True, True, True),
            "enc_dilations": (1, 1, 1, 1, 1), "dec_dilations": (1, 1, 1, 1), "with_cp": False,
            "conv_cfg": None, "norm_cfg": dict(_NORM), "act_cfg": {"type": "ReLU"},
            "upsample_cfg": {"type": "InterpConv"}, "norm_eval": False}


def _decode_head(head, dice=False, base_channels=64, channels=None):
    common = {"in_channels": base_channels, "in_index": 4, "dropout_ratio": 0.1, "num_classes": 2,
              "norm_cfg": dict(_NORM), "align_corners": False, "loss_decode": _loss(1.0, dice)}
    if head == "fcn":
        return {"type": "FCNHead", **common, "channels": channels or 64, "num_convs": 1,
                "concat_input": False}
    if head == "pspnet":
        return {"type": "PSPHead", **common, "channels": channels or 16,
                "pool_scales": (1, 2, 3, 6)}
    return {"type": "ASPPHead", **common, "channels": channels or 16,
            "dilations": (1, 12, 24, 36)}


def _auxiliary_head(base_channels=64, channels=64):
    return {"type": "FCNHead", "in_channels": base_channels * 2, "in_index": 3,
            "channels": channels, "num_convs": 1, "concat_input": False, "dropout_ratio": 0.1,
            "num_classes": 2, "norm_cfg": dict(_NORM), "align_corners": False,
            "loss_decode": _loss(0.4)}


def _data(dataset, data_root, img_scale, image_size, crop, num_train, num_val):
    return {"dataset": dataset, "data_root": data_root,
            # mmseg's img_scale (keep-ratio rescale target); the identity for the native images
            "img_scale": img_scale, "image_size": image_size,  # image_size: H x W of the images
            "crop_size": (crop, crop), "ratio_range": (0.5, 2.0), "cat_max_ratio": 0.75,
            "flip_prob": 0.5, "photometric_distortion": True,
            "mean": MEAN, "std": STD, "pad_val": 0, "seg_pad_val": 255, "ignore_index": 255,
            # labels resized on the image's pixel grid; 'mmseg' = mmseg's pipeline bit for bit,
            # including its half-pixel label offset (fastunet.data.transforms)
            "label_resize": "centre",
            "num_train": num_train, "num_val": num_val}


def _train(max_iters=40000, batch_size=16, lr=0.01, interval=4000):
    # SGD + poly: lr = (lr - min_lr) * (1 - it / max_iters) ** power + min_lr, per iteration;
    # batch_size is the total (mmseg: 4 GPUs x 4)
    return {"max_iters": max_iters, "batch_size": batch_size, "lr": lr, "momentum": 0.9,
            "weight_decay": 5e-4, "min_lr": 1e-4, "power": 0.9, "eval_interval": interval,
            "checkpoint_interval": interval}


def _published(head, ds, dice):
    tag, _, dataset, img_scale, image_size, crop, stride, n_train, n_val = _DATASETS[ds]
    name = f"{head}_unet_s5-d16_{'ce-1.0-dice-3.0_' if dice else ''}{tag}"
    model = {"type": "EncoderDecoder", "backbone": _backbone(),
             "decode_head": _decode_head(head, dice), "auxiliary_head": _auxiliary_head(),
             "test_cfg": {"mode": "slide", "crop_size": (crop, crop), "stride": (stride, stride)}}
    data = _data(dataset, f"data/{dataset}", img_scale, image_size, crop, n_train, n_val)
    return name, {"name": name, "model": model, "data": data, "train": _train()}


def _synthetic():
    # The default of `python -m fastunet.train`: the published FCN recipe scaled down to finish
    # on a 2-core CPU in minutes (data generation, training, two evaluations included).
    # - data: fastunet's built-in synthetic fundus images at DRIVE's size (584 x 565, vessel masks
    #   and FOV masks), 20 training / 5 validation images, DRIVE's pipeline and 64x64 crops with
    #   the labels on the image's pixel grid (the default label_resize);
    # - model: UNet-S5-D16 + FCN head at a quarter of the width (base_channels=16: 1.8M
    #   parameters, 1/16 of the FLOPs), evaluated like DRIVE (slide, 64x64 windows, stride 42);
    # - schedule: SGD + poly as published, but batch 4, lr 0.1, 3000 iterations, evaluation and
    #   checkpoint every 1500: the best of the batch / lr / length settings tried on the
    #   validation set within the same training time (docs/recipe.md).
    model = {"type": "EncoderDecoder", "backbone": _backbone(base_channels=16),
             "decode_head": _decode_head("fcn", base_channels=16, channels=16),
             "auxiliary_head": _auxiliary_head(base_channels=16, channels=16),
             "test_cfg": {"mode": "slide", "crop_size": (64, 64), "stride": (42, 42)}}
    data = _data("synthetic", None, (584, 565), (584, 565), 64, 20, 5)
    data["synthetic_seed"] = 0  # selects the generated image set (SyntheticVessels seed)
    return {"name": "synthetic", "model": model, "data": data,
            "train": _train(max_iters=3000, batch_size=4, lr=0.1, interval=1500)}


def _registry():
    configs, aliases = {}, {}
    for dice in (False, True):
        for ds, (tag, suffix, *_rest) in _DATASETS.items():
            for head in _HEADS:
                name, cfg = _published(head, ds, dice)
                configs[name] = cfg
                # mmseg 1.x file name (configs/unet/*.py)
                aliases[f"unet-s5-d16_{head}_4xb4-{'ce-1.0-dice-3.0-' if dice else ''}40k_"
                        f"{suffix}"] = name
                if dice and ds == "chase_db1":  # mmseg 0.x spelled these files '..._chase-db1'
                    aliases[name.replace("chase_db1", "chase-db1")] = name
    # mmseg 1.x names this one file with an underscore
    aliases["unet_s5-d16_deeplabv3_4xb4-40k_chase-db1-128x128"] = (
        "deeplabv3_unet_s5-d16_128x128_40k_chase_db1")
    configs["synthetic"] = _synthetic()
    return configs, aliases


_CONFIGS, _ALIASES = _registry()


def list_configs():
    """Names of all configs: the 24 published ones, then ``synthetic``."""
    return list(_CONFIGS)


def list_aliases():
    """Alias -> config name (mmseg 1.x and 0.x file names)."""
    return dict(_ALIASES)


def resolve_name(name):
    """Config name for a name, alias, or mmseg config path (``.../unet-s5-d16_....py``)."""
    if not isinstance(name, str):
        raise TypeError(f"config name must be a string, got {type(name).__name__}")
    key = name.strip().replace("\\", "/").rsplit("/", 1)[-1]
    if key.endswith(".py"):
        key = key[:-3]
    if key in _CONFIGS:
        return key
    if key in _ALIASES:
        return _ALIASES[key]
    close = difflib.get_close_matches(key, [*_CONFIGS, *_ALIASES], n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ConfigKeyError(f"unknown config {name!r}{hint} (fastunet.list_configs() lists all "
                   f"{len(_CONFIGS)})")


def get_config(name):
    """A fresh deep copy of the named config (a name or an mmseg alias), or the config that a
    file describes (``.yaml``/``.yml``/``.json``, or an mmseg ``.py`` config when the file
    exists; else its name as an alias: ``configs/unet/unet-s5-d16_fcn_4xb4-40k_drive-64x64.py``).
    Raises ConfigKeyError for an unknown name, ConfigFileError for a file it cannot read."""
    from .config_files import ConfigFileError, is_config_file, load_config_file

    if is_config_file(name):
        if os.path.exists(name) or not os.fspath(name).lower().endswith(".py"):
            return load_config_file(name)
        try:
            return copy.deepcopy(_CONFIGS[resolve_name(name)])
        except ConfigKeyError as e:
            raise ConfigFileError(f"config file {os.fspath(name)} not found, nor is it a "
                                  f"built-in config name ({e})") from None
    return copy.deepcopy(_CONFIGS[resolve_name(name)])


def _parse_value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word such as DRIVE or a path


def apply_overrides(cfg, overrides):
    """Apply ``["a.b.c=value", ...]`` (values as Python literals) to ``cfg`` in place; returns it.

    List items are addressed by index (``model.decode_head.loss_decode.1.loss_weight=1.0``).
    New keys may be added only to dicts that describe a module (they have a ``type``), whose
    builder checks them; elsewhere an unknown key is an error that suggests the nearest key.
    """
    for item in overrides or ():
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.subkey=value")
        path, text = item.split("=", 1)
        keys = path.strip().split(".")
        node = cfg
        for depth, key in enumerate(keys):
            last = depth == len(keys) - 1
            where = ".".join(keys[:depth + 1])
            if isinstance(node, list):
                if not (key.lstrip("-").isdigit() and -len(node) <= int(key) < len(node)):
                    raise ConfigKeyError(f"config key {where!r}: {key!r} is not an index of a list "
                                   f"of {len(node)}")
                key = int(key)
            elif isinstance(node, dict):
                if key not in node and not (last and "type" in node):
                    parent = ".".join(keys[:depth] + [""])
                    close = difflib.get_close_matches(key, [str(k) for k in node], n=3)
                    hint = (f"; did you mean {', '.join(repr(parent + c) for c in close)}?"
                            if close else "")
                    raise ConfigKeyError(f"unknown config key {where!r}{hint}")
            else:
                raise ConfigKeyError(f"config key {where!r}: {'.'.join(keys[:depth])!r} is a "
                               f"{type(node).__name__}, not a dict or list")
            if last:
                node[key] = _parse_value(text.strip())
            else:
                node = node[key]
    return cfg
