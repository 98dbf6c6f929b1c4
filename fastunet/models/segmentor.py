"""EncoderDecoder: backbone -> decode head (+ auxiliary head for training), as mmseg's segmentor.

``build_segmentor(cfg)`` takes a fastunet config (see :mod:`fastunet.models.configs`) or its
``model`` part, in mmseg's layout, and returns a module whose ``state_dict()`` keys equal mmseg's
``EncoderDecoder`` keys, so mmseg checkpoints load with ``strict=True``.
"""
import copy

import torch.nn as nn

from ..nn import cpu_fused_layout
from .heads import build_head, resize
from .unet import UNet
from .weight_init import InitWeights

# mmseg model-dict keys that have no effect here (normalisation happens in the data pipeline)
_IGNORED_MODEL_KEYS = ("data_preprocessor", "train_cfg", "init_cfg", "neck")


def _add_prefix(losses, prefix):
    return {f"{prefix}.{k}": v for k, v in losses.items()}


def _pair(v):
    return (int(v), int(v)) if isinstance(v, (int, float)) else tuple(int(x) for x in v)


class EncoderDecoder(InitWeights, nn.Module):
    """UNet backbone, a decode head and optional auxiliary head(s); logits at input resolution.

    ``init_weights()`` initialises the backbone and heads as mmseg does (mmengine's protocol:
    :mod:`fastunet.models.weight_init`); a list of auxiliary heads is an ``nn.ModuleList``, which
    mmengine does not descend into either.
    """

    def __init__(self, backbone, decode_head, auxiliary_head=None, test_cfg=None):
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        if isinstance(auxiliary_head, (list, tuple)):
            auxiliary_head = nn.ModuleList(auxiliary_head)
        self.auxiliary_head = auxiliary_head
        self.align_corners = decode_head.align_corners
        self.num_classes = decode_head.num_classes
        self.out_channels = decode_head.out_channels
        self.test_cfg = dict(test_cfg or {"mode": "whole"})
        mode = self.test_cfg.get("mode", "whole")
        if mode not in ("slide", "whole"):
            raise ValueError(f"test_cfg mode must be 'slide' or 'whole', got {mode!r}")
        if mode == "slide" and not ("crop_size" in self.test_cfg and "stride" in self.test_cfg):
            raise ValueError("test_cfg mode 'slide' needs crop_size and stride")

    @property
    def with_auxiliary_head(self):
        """Whether an auxiliary head exists (it is used for training only)."""
        return self.auxiliary_head is not None

    def extract_feat(self, x):
        """Backbone feature maps of normalised images (N, 3, h, w)."""
        return self.backbone(x)

    def encode_decode(self, x):
        """Normalised images (N, 3, h, w) -> decode-head logits resized to (N, C, h, w).

        The logits come back in x's memory format. On CPU, a model with fused inference blocks
        runs an NCHW input in channels_last inside (see ``nn.cpu_fused_layout``).
        """
        layout = cpu_fused_layout(self, x)
        inner = x if layout is None else x.contiguous(memory_format=layout)
        seg_logits = self.decode_head(self.extract_feat(inner))
        out = resize(seg_logits, x.shape[2:], align_corners=self.align_corners)
        return out if layout is None else out.contiguous()

    def forward(self, x):
        """Same as :meth:`encode_decode`."""
        return self.encode_decode(x)

    def loss(self, x, seg_label):
        """Weighted training losses: ``decode.loss_ce`` (+ ``decode.loss_dice``), ``aux.loss_ce``.

        ``seg_label`` is int64 (N, H, W) (or (N, 1, H, W)), 255 = ignore; each head's logits are
        resized bilinearly to the label size first. Sum the values to get the total loss.
        """
        if seg_label.dim() == 4:
            seg_label = seg_label.squeeze(1)
        if seg_label.dim() != 3 or seg_label.shape[0] != x.shape[0]:
            raise ValueError(f"seg_label must be (N, H, W) with N={x.shape[0]}, got shape "
                             f"{tuple(seg_label.shape)}")
        seg_label = seg_label.long()
        layout = cpu_fused_layout(self, x)  # fused CPU blocks run channels_last
        feats = self.extract_feat(x if layout is None else x.contiguous(memory_format=layout))
        losses = _add_prefix(self.decode_head.loss(feats, seg_label), "decode")
        if isinstance(self.auxiliary_head, nn.ModuleList):
            for i, head in enumerate(self.auxiliary_head):
                losses.update(_add_prefix(head.loss(feats, seg_label), f"aux_{i}"))
        elif self.auxiliary_head is not None:
            losses.update(_add_prefix(self.auxiliary_head.loss(feats, seg_label), "aux"))
        return losses

    def _engine(self, mode, crop_size=None, stride=None, **options):
        """The inference engine for these settings, kept so that its probe runs once."""
        from ..inference.engine import InferenceEngine

        options.setdefault("size_divisor", getattr(self.backbone, "downsample_rate", 16))
        crop = None if crop_size is None else _pair(crop_size)
        step = None if stride is None else _pair(stride)
        key = (mode, crop, step, tuple(sorted(options.items())))
        engines = self.__dict__.setdefault("_inference_engines", {})
        if key not in engines:
            engines[key] = InferenceEngine(self.encode_decode, mode, crop, step,
                                           state_version=self.weights_version, **options)
        return engines[key]

    def weights_version(self):
        """Changes whenever a parameter or buffer is updated in place or replaced, or a module
        switches train/eval: the engine's CUDA graphs (which replay the weights, and the folded
        Conv-BN weights, of their capture) are recaptured then."""
        tensors = [*self.parameters(), *self.buffers()]
        return (tuple((t.data_ptr(), t._version) for t in tensors),
                tuple(m.training for m in self.modules()))

    def slide_inference(self, x, crop_size, stride, **options):
        """``slide`` mode through :class:`fastunet.inference.InferenceEngine`: windows in
        batches, one fused aggregation; equal to mmseg's loop
        (``fastunet.ops.tile_reference.slide_inference(self.encode_decode, ...)``) up to float
        rounding (see the engine for ``options`` and for images smaller than the crop)."""
        return self._engine("slide", crop_size, stride, **options)(x)

    def whole_inference(self, x, **options):
        """Logits of the whole image in one forward pass (reflect-padded to the backbone's
        downsample rate and cropped back when needed)."""
        return self._engine("whole", **options)(x)

    def inference(self, x, mode=None, **options):
        """Logits (N, C, H, W) of normalised images, in ``mode`` ("slide", "overlap-tile" or
        "whole"; default: the config's test mode), computed by the inference engine (no
        autograd; call in eval mode, as mmseg does). ``options`` go to
        :class:`fastunet.inference.InferenceEngine` (window_batch, precision, tta,
        output_device, ...)."""
        mode = self.test_cfg.get("mode", "whole") if mode is None else mode
        if mode == "slide":
            crop, stride = self.test_cfg.get("crop_size"), self.test_cfg.get("stride")
            if crop is None or stride is None:
                raise ValueError("slide inference needs test_cfg crop_size and stride; this "
                                 "config has none (use mode='whole' or 'overlap-tile')")
            return self.slide_inference(x, crop, stride, **options)
        if mode == "whole":
            return self.whole_inference(x, **options)
        if mode == "overlap-tile":
            return self._engine("overlap-tile", **options)(x)
        raise ValueError(f"unknown inference mode {mode!r}: use 'slide', 'overlap-tile' or "
                         "'whole'")


def _positive_ints(value):
    values = value if isinstance(value, (list, tuple)) else (value,)
    return bool(values) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                                for v in values)


def _checked(cls, cfg, where, positive):
    """cls(**cfg), with misspelt keywords and non-positive sizes reported as one-line
    ValueErrors naming the config key (instead of a TypeError or an error deep in torch)."""
    import difflib
    import inspect

    params, open_ended = [], True
    for klass in cls.__mro__:  # heads pass **kwargs on to BaseDecodeHead
        if klass is object or "__init__" not in vars(klass):
            continue
        sig = inspect.signature(klass.__init__).parameters.values()
        params += [p.name for p in sig if p.name != "self"
                   and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        open_ended = any(p.kind == p.VAR_KEYWORD for p in sig)
        if not open_ended or klass is nn.Module:
            break
    unknown = [k for k in cfg if k not in params]
    if unknown and not open_ended:
        close = difflib.get_close_matches(unknown[0], params, n=1)
        hint = f"; did you mean '{where}.{close[0]}'?" if close else ""
        raise ValueError(f"unknown config key '{where}.{unknown[0]}' for {cls.__name__}{hint}")
    for key in positive:
        if key in cfg and not _positive_ints(cfg[key]):
            raise ValueError(f"config key '{where}.{key}' must be a positive integer (or a list "
                             f"of them), got {cfg[key]!r}")
    return cls(**cfg)


def _build_backbone(cfg):
    cfg = dict(cfg)
    kind = cfg.pop("type", "UNet")
    if kind != "UNet":
        raise ValueError(f"unsupported backbone type {kind!r}: fastunet implements 'UNet'")
    return _checked(UNet, cfg, "model.backbone", ("in_channels", "base_channels", "num_stages"))


def _build_head(cfg, where):
    from .heads import HEADS

    cfg = dict(cfg)
    kind = cfg.get("type")
    if kind not in HEADS:
        return build_head(cfg)  # its own error for an unknown type
    cfg.pop("type")
    return _checked(HEADS[kind], cfg, where, ("in_channels", "channels", "num_classes"))


def _check_test_cfg(test_cfg):
    for key in ("crop_size", "stride"):
        if test_cfg and key in test_cfg and not _positive_ints(test_cfg[key]):
            raise ValueError(f"config key 'model.test_cfg.{key}' must be a positive integer or "
                             f"(h, w) pair, got {test_cfg[key]!r}")


def build_segmentor(cfg):
    """Build an :class:`EncoderDecoder` from a full config (with ``model``) or its model part."""
    if not isinstance(cfg, dict):
        raise TypeError(f"build_segmentor expects a config dict, got {type(cfg).__name__} "
                        f"(use fastunet.get_config(name) for a named config)")
    cfg = copy.deepcopy(cfg.get("model", cfg))
    kind = cfg.pop("type", "EncoderDecoder")
    if kind != "EncoderDecoder":
        raise ValueError(f"unsupported segmentor type {kind!r}: fastunet implements "
                         f"'EncoderDecoder'")
    if cfg.pop("pretrained", None) is not None:
        raise ValueError("model.pretrained is not supported: build the model, then "
                         "fastunet.load_checkpoint(model, path)")
    if cfg.get("neck") is not None:
        raise ValueError("necks are not supported: UNet feeds the heads directly")
    for key in _IGNORED_MODEL_KEYS:
        cfg.pop(key, None)
    unknown = sorted(set(cfg) - {"backbone", "decode_head", "auxiliary_head", "test_cfg"})
    if unknown:
        raise ValueError(f"unknown model config keys {unknown}")
    if "backbone" not in cfg or "decode_head" not in cfg:
        raise ValueError("model config needs 'backbone' and 'decode_head'")
    _check_test_cfg(cfg.get("test_cfg"))
    aux = cfg.get("auxiliary_head")
    if isinstance(aux, (list, tuple)):
        aux = [_build_head(c, f"model.auxiliary_head.{i}") for i, c in enumerate(aux)]
    elif aux is not None:
        aux = _build_head(aux, "model.auxiliary_head")
    return EncoderDecoder(_build_backbone(cfg["backbone"]),
                          _build_head(cfg["decode_head"], "model.decode_head"), aux,
                          cfg.get("test_cfg"))
