"""Weight-only int8 quantisation: per-output-channel symmetric scales, float activations."""
from dataclasses import dataclass

import torch


@dataclass
class QuantizedWeight:
    """``weight ~= qweight.float() * scale[:, None]``; ``qweight`` int8 ``[out, in]``, ``scale`` fp32 ``[out]``."""
    qweight: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> "QuantizedWeight":
        w = weight.float()
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        qweight = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        return cls(qweight.contiguous(), scale.contiguous())

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return (self.qweight.float() * self.scale[:, None]).to(dtype)

    @property
    def shape(self):
        return self.qweight.shape

    @property
    def device(self):
        return self.qweight.device

    @property
    def dtype(self):
        return torch.int8

    def to(self, device):
        return QuantizedWeight(self.qweight.to(device), self.scale.to(device))
