# UNet-S5-D16 with a PSP decode head, built on the FCN model file: mmseg 0.x had no
# data_preprocessor (the pipeline normalises), and the decode head is replaced, not merged
_base_ = '../../../v1/_base_/models/fcn_unet_s5-d16.py'
data_preprocessor = None
model = dict(
    data_preprocessor=None,
    decode_head=dict(
        _delete_=True,
        type='PSPHead', in_channels=64, in_index=4, channels=16, pool_scales=(1, 2, 3, 6),
        dropout_ratio=0.1, num_classes=2, norm_cfg=dict(type='SyncBN', requires_grad=True),
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)))
