import time, torch, fastunet, copy
from fastunet.inference import InferenceEngine
torch.manual_seed(0)
base = fastunet.build_segmentor(fastunet.get_config("fcn_unet_s5-d16_64x64_40k_drive")).eval()
plain = copy.deepcopy(base)
for m in plain.modules():
    if isinstance(m, fastunet.nn.ConvBNReLU): m.fused = False
plain = plain.to(memory_format=torch.channels_last)
fused = fastunet.fuse(base).to(memory_format=torch.channels_last)
x = torch.randn(1, 3, 584, 565)
res = {}
engines = {f"{n}_{p}": InferenceEngine(m.encode_decode, "slide", 64, 42, channels_last=True, precision=p)
           for n, m in (("fused", fused), ("plain", plain)) for p in ("fp32", "bf16")}
outs = {k: e(x) for k, e in engines.items()}
for r in range(2):
    for k, e in engines.items():
        t = time.perf_counter(); e(x); res[k] = min(res.get(k, 1e9), time.perf_counter() - t)
print({k: round(v, 3) for k, v in res.items()}, {k: e.last_schedule.window_batch for k, e in engines.items()})
print("plain bf16 agreement", (outs["plain_bf16"].argmax(1) == outs["fused_fp32"].argmax(1)).float().mean().item())
