"""Sample quality of face models as numbers, with a detector that ships inside a package (Langley et al., TMLR 2022
show CelebA samples; FID needs Inception weights that cannot be downloaded here).

Optional dependency: ``facenet-pytorch`` (PyPI, MIT), whose MTCNN face detector (Zhang et al., 2016: P-, R- and
O-net) has its weights inside the package and runs offline on the CPU. Its metadata pins torch<2.3 and numpy<2,
so install it with ``pip install --no-deps facenet-pytorch`` (it imports and runs with this project's torch).
Everything here raises a clear ImportError without it; `available()` says whether it is there.

- `FaceNet.detection_probs` / `face_detection_rate`: an image (RGB in [0, 1], any size; resized, keeping its
  aspect ratio, so that its shorter side is ``size`` = 64 px) counts as a face when MTCNN returns at least one
  box, i.e. some candidate passes the three stages at thresholds (0.6, 0.7, ``threshold`` = 0.9); minimum face
  size 20 px. On 200 CelebA 64×64 test crops: real 100 %, Gaussian blur σ = 2 px 96 %, σ = 4 px 53 %, uniform
  noise 0 %, smooth colour blobs 0 % (upsampling to 112 or 160 px changed these by ≤ 3 points and cost more).
- `FaceNet.features`: the 256-d activations of the O-net's last hidden layer (dense5 + PReLU) on the whole image
  resized to the O-net's 48×48 input, as MTCNN normalises it ((255·x − 127.5)/128). A Fréchet distance in this
  space (`sosvae_lib.metrics.frechet_distance`) is reported as ``fd_*``: it is **not FID** (another network,
  other features, a face-crop detector rather than an image classifier), only comparable within this project.
- `face_reference` (real test images and the same blurred with a Gaussian of σ = 2 px) and `face_scores`
  (generated means and samples) give the keys that `sosvae_lib.evaluate` records for 3-channel data.

Cost: about 0.05–0.1 s per image on 2 CPU cores; callers cap the number of images.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any

import torch
from torch.nn import functional as F

from .metrics import frechet_distance

__all__ = ["available", "FaceNet", "face_detection_rate", "gaussian_blur", "face_reference", "face_scores",
           "INSTALL_HINT"]

INSTALL_HINT = "pip install --no-deps facenet-pytorch"


def available() -> bool:
    """True when the optional package ``facenet_pytorch`` can be imported."""
    return importlib.util.find_spec("facenet_pytorch") is not None


def _check_images(images: torch.Tensor, name: str = "images") -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name}: must be RGB images [N, 3, H, W] with values in [0, 1], got {shape}")
    return images.detach().float().cpu()


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Images [N, C, H, W] convolved with a normalised Gaussian of standard deviation ``sigma`` pixels (separable,
    kernel radius ⌈3σ⌉, reflected borders; on the images' device); sigma = 0 returns a copy."""
    if not sigma >= 0:
        raise ValueError(f"sigma: must be >= 0 (pixels), got {sigma!r}")
    x = images.float()
    if sigma == 0:
        return x.clone()
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    pad = min(radius, x.shape[-1] - 1, x.shape[-2] - 1)
    if pad < radius:  # reflect padding needs the image to be larger than the radius; fall back to replicate
        x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    else:
        x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.reshape(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.reshape(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


class FaceNet:
    """MTCNN of ``facenet-pytorch`` as a face detector and a feature network (see the module docstring).

    Args: ``size`` shorter side (px) the images are resized to before detection (64); ``threshold`` O-net
    probability a detection needs (0.9); ``min_face_size`` px (20); ``batch_size`` images per MTCNN call (32);
    ``device``.
    """

    def __init__(self, size: int = 64, threshold: float = 0.9, min_face_size: int = 20, batch_size: int = 32,
                 device: str | torch.device = "cpu"):
        if not available():
            raise ImportError(f"facenet-pytorch: not installed; the face metrics need it ({INSTALL_HINT})")
        if isinstance(size, bool) or not isinstance(size, int) or size < min_face_size:
            raise ValueError(f"size: must be an integer >= min_face_size = {min_face_size} (pixels), got {size!r}")
        if not 0 < threshold < 1:
            raise ValueError(f"threshold: must be in (0, 1), got {threshold!r}")
        from facenet_pytorch import MTCNN

        self.size, self.threshold, self.batch_size = size, float(threshold), int(batch_size)
        self.mtcnn = MTCNN(image_size=size, min_face_size=min_face_size, thresholds=[0.6, 0.7, self.threshold],
                           keep_all=True, device=torch.device(device)).eval()
        self.device = torch.device(device)
        self._hidden: list[torch.Tensor] = []
        self.mtcnn.onet.prelu5.register_forward_hook(lambda _m, _i, out: self._hidden.append(out))

    @staticmethod
    def _resize(images: torch.Tensor, side: int, square: bool = False) -> torch.Tensor:
        """Images resized (bilinear, antialiased) to side×side (``square``) or to shorter side ``side``."""
        h, w = images.shape[-2:]
        size = (side, side) if square else (round(h * side / min(h, w)), round(w * side / min(h, w)))
        if (h, w) == size:
            return images
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)

    @torch.no_grad()
    def detection_probs(self, images: torch.Tensor) -> torch.Tensor:
        """[N] the largest face probability MTCNN returns for each image [N, 3, H, W] in [0, 1] (0 when no
        candidate passes the three stages)."""
        x = _check_images(images)
        probs = []
        for start in range(0, x.shape[0], self.batch_size):
            batch = self._resize(x[start:start + self.batch_size], self.size).clamp(0, 1)
            hwc = (batch * 255).round().permute(0, 2, 3, 1).contiguous().to(self.device)
            self._hidden.clear()
            _, p = self.mtcnn.detect(hwc)
            probs += [max((float(v) for v in row if v is not None), default=0.0) for row in p]
        self._hidden.clear()
        return torch.tensor(probs, dtype=torch.float64)

    def detected(self, images: torch.Tensor) -> torch.Tensor:
        """bool [N]: MTCNN finds a face (probability ≥ ``threshold``) in each image."""
        return self.detection_probs(images) >= self.threshold

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 256] O-net last hidden-layer features of images [N, 3, H, W] in [0, 1] resized to 48×48."""
        x = _check_images(images)
        out = []
        for start in range(0, x.shape[0], self.batch_size):
            batch = self._resize(x[start:start + self.batch_size], 48, square=True).clamp(0, 1)
            self._hidden.clear()
            self.mtcnn.onet(((batch * 255 - 127.5) * 0.0078125).to(self.device))
            out.append(self._hidden[-1].double().cpu())
        self._hidden.clear()
        return torch.cat(out)


def face_detection_rate(images: torch.Tensor, net: FaceNet | None = None) -> float:
    """Fraction of images [N, 3, H, W] in [0, 1] in which ``net`` (default `FaceNet()`) detects a face."""
    net = net or FaceNet()
    return float(net.detected(images).double().mean())


def face_reference(real: torch.Tensor, net: FaceNet | None = None, blur_sigma: float = 2.0) -> dict[str, Any]:
    """Reference numbers of real images [N, 3, H, W]: ``face_rate_real``, ``face_rate_blur<σ>`` (the same images
    blurred by `gaussian_blur`), ``fd_blur<σ>`` (Fréchet distance, O-net features, blurred vs real; not FID), and
    ``features`` [N, 256] of the real images for `face_scores`. σ appears in the keys as ``%g``."""
    net = net or FaceNet()
    real = _check_images(real, "real")
    blurred = gaussian_blur(real, blur_sigma)
    feats = net.features(real)
    tag = f"{blur_sigma:g}".replace(".", "p")
    return {"face_rate_real": float(net.detected(real).double().mean()),
            f"face_rate_blur{tag}": float(net.detected(blurred).double().mean()),
            f"fd_blur{tag}": frechet_distance(net.features(blurred), feats),
            "features": feats}


def face_scores(means: torch.Tensor | None, samples: torch.Tensor, reference: dict[str, Any],
                net: FaceNet | None = None) -> dict[str, float]:
    """Face-detection rates of generated means and samples ([N, 3, H, W] in [0, 1]; means may be None) and their
    Fréchet distances to the real images of ``reference`` (`face_reference`) in O-net feature space (not FID):
    ``face_rate_means``, ``face_rate_samples``, ``fd_means``, ``fd_samples``."""
    net = net or FaceNet()
    samples = _check_images(samples, "samples")
    out = dict(face_rate_samples=float(net.detected(samples).double().mean()),
               fd_samples=frechet_distance(net.features(samples), reference["features"]))
    if means is not None:
        means = _check_images(means, "means")
        out["face_rate_means"] = float(net.detected(means).double().mean())
        out["fd_means"] = (frechet_distance(net.features(means), reference["features"]) if means.shape[0] > 1
                           else float("nan"))
    return out
