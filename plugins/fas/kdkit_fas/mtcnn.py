"""MTCNN (Zhang et al., "Joint Face Detection and Alignment Using Multitask Cascaded
Convolutional Networks", IEEE SPL 2016): face boxes, five landmarks and a confidence per face.

The three networks (P-, R-, O-Net) are defined here; their trained weights are the ones the
`facenet-pytorch` wheel ships (MIT licence, converted from the authors' release), read from its
installed `data/` folder as plain state dicts with `weights_only=True`. The package itself is not
imported: its metadata pins an old torch, so it is installed without its dependencies::

    pip install --no-deps facenet-pytorch==2.6.0

The cascade: an image pyramid through P-Net (12x12 windows, stride 2), non-maximum suppression,
R-Net on 24x24 crops of the candidates, O-Net on 48x48 crops, which also gives the landmarks.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import nms

INSTALL = "pip install --no-deps facenet-pytorch==2.6.0"
THRESHOLDS = (0.6, 0.7, 0.7)  # face probability kept after P-, R- and O-Net
PYRAMID_FACTOR = 0.709  # each pyramid level is this much smaller (half the area every two levels)


@dataclass(frozen=True)
class Detection:
    """One face found by the cascade: box `(x1, y1, x2, y2)`, confidence in [0, 1], landmarks (5, 2) as
    left eye, right eye, nose, left and right mouth corner (in the image's left-right order)."""

    box: tuple[float, float, float, float]
    confidence: float
    landmarks: np.ndarray


def weights_folder() -> Path | None:
    """The `data/` folder of the installed facenet-pytorch wheel, or None (found without
    importing the package)."""
    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    return folder if all((folder / f"{n}.pt").is_file() for n in ("pnet", "rnet", "onet")) else None


def _conv_prelu(cin: int, cout: int, k: int, index: int) -> dict[str, nn.Module]:
    return {f"conv{index}": nn.Conv2d(cin, cout, k), f"prelu{index}": nn.PReLU(cout)}


class PNet(nn.Module):
    """Proposal network: fully convolutional, face probability and box offsets per 12x12 window."""

    def __init__(self) -> None:
        super().__init__()
        for cin, cout, i in ((3, 10, 1), (10, 16, 2), (16, 32, 3)):
            for name, module in _conv_prelu(cin, cout, 3, i).items():
                self.add_module(name, module)
        self.conv4_1, self.conv4_2 = nn.Conv2d(32, 2, 1), nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(box offsets (N, 4, H', W'), face probability (N, H', W'))."""
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 2, 2, ceil_mode=True)
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_2(x), torch.softmax(self.conv4_1(x), dim=1)[:, 1]


def _flatten_like_the_release(x: torch.Tensor) -> torch.Tensor:
    # the released dense weights were trained on (width, height, channel)-ordered features
    return x.permute(0, 3, 2, 1).flatten(1)


class RNet(nn.Module):
    """Refinement network on 24x24 crops: face probability and box offsets."""

    def __init__(self) -> None:
        super().__init__()
        for cin, cout, k, i in ((3, 28, 3, 1), (28, 48, 3, 2), (48, 64, 2, 3)):
            for name, module in _conv_prelu(cin, cout, k, i).items():
                self.add_module(name, module)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1, self.dense5_2 = nn.Linear(128, 2), nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(box offsets (N, 4), face probability (N,))."""
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = self.prelu4(self.dense4(_flatten_like_the_release(self.prelu3(self.conv3(x)))))
        return self.dense5_2(x), torch.softmax(self.dense5_1(x), dim=1)[:, 1]


class ONet(nn.Module):
    """Output network on 48x48 crops: face probability, box offsets and five landmarks."""

    def __init__(self) -> None:
        super().__init__()
        for cin, cout, k, i in ((3, 32, 3, 1), (32, 64, 3, 2), (64, 64, 3, 3), (64, 128, 2, 4)):
            for name, module in _conv_prelu(cin, cout, k, i).items():
                self.add_module(name, module)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1, self.dense6_2, self.dense6_3 = nn.Linear(256, 2), nn.Linear(256, 4), nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(box offsets (N, 4), landmarks (N, 10) as 5 x then 5 y, relative, face probability (N,))."""
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu3(self.conv3(x)), 2, 2, ceil_mode=True)
        x = self.prelu5(self.dense5(_flatten_like_the_release(self.prelu4(self.conv4(x)))))
        return self.dense6_2(x), self.dense6_3(x), torch.softmax(self.dense6_1(x), dim=1)[:, 1]


def _normalise(images: torch.Tensor) -> torch.Tensor:
    return (images - 127.5) * 0.0078125  # the range the released networks were trained on


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """Boxes (x1, y1, x2, y2) made square around their centres (side = the longer side)."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = torch.maximum(w, h)
    x1, y1 = boxes[:, 0] + (w - side) / 2, boxes[:, 1] + (h - side) / 2
    return torch.stack([x1, y1, x1 + side, y1 + side], 1)


def _regress(boxes: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Apply the networks' box offsets (fractions of the box's width and height)."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return boxes + offsets * torch.stack([w, h, w, h], 1)


def _crops(image: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Each box of `image` (1, 3, H, W) cut out (zero outside the image) and resized to size²."""
    _, _, height, width = image.shape
    out = []
    for x1, y1, x2, y2 in boxes.round().int().tolist():
        x2, y2 = max(x2, x1 + 1), max(y2, y1 + 1)
        patch = image.new_zeros(1, 3, y2 - y1, x2 - x1)
        sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)
        if sx2 > sx1 and sy2 > sy1:
            patch[:, :, sy1 - y1 : sy2 - y1, sx1 - x1 : sx2 - x1] = image[:, :, sy1:sy2, sx1:sx2]
        out.append(F.interpolate(patch, size=(size, size), mode="area"))
    return torch.cat(out) if out else image.new_zeros(0, 3, size, size)


class MTCNN:
    """The three-network cascade; `detect(rgb)` gives every face found, most confident first.

    `min_face` is the smallest face side searched for, in pixels (the pyramid's first scale maps
    it onto P-Net's 12-pixel window); `detect` takes another per image.
    """

    def __init__(self, folder: Path | None = None, min_face: int = 20) -> None:
        folder = folder or weights_folder()
        if folder is None:
            raise FileNotFoundError(f"the MTCNN weights come with facenet-pytorch; install them: {INSTALL}")
        self.min_face = min_face
        self.nets = (PNet(), RNet(), ONet())
        for net, name in zip(self.nets, ("pnet", "rnet", "onet"), strict=True):
            net.load_state_dict(torch.load(folder / f"{name}.pt", weights_only=True))
            net.eval()

    @torch.inference_mode()
    def detect(self, rgb: np.ndarray, min_face: int | None = None) -> list[Detection]:
        """Faces of an RGB uint8 image (H, W, 3) at least `min_face` pixels wide (default: the
        detector's)."""
        image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float()
        boxes = self._propose(image, min_face or self.min_face)
        boxes = self._refine(image, boxes)
        return self._output(image, boxes)

    def _propose(self, image: torch.Tensor, min_face: int) -> torch.Tensor:
        """P-Net over the pyramid: candidate boxes (N, 5) with their probability."""
        pnet, height, width = self.nets[0], image.shape[2], image.shape[3]
        scale, found = 12 / min_face, []
        while min(height, width) * scale >= 12:
            size = (math.ceil(height * scale), math.ceil(width * scale))
            offsets, prob = pnet(_normalise(F.interpolate(image, size=size, mode="area")))
            ys, xs = torch.nonzero(prob[0] >= THRESHOLDS[0], as_tuple=True)
            if len(ys):
                # window (x, y) of the output map covers input pixels 2x .. 2x + 11 of this level
                cells = torch.stack([xs, ys, xs, ys], 1).float() * 2 + torch.tensor([1.0, 1.0, 12.0, 12.0])
                level = torch.cat(
                    [(cells / scale).floor(), prob[0, ys, xs, None], offsets[0, :, ys, xs].T], 1
                )
                found.append(level[nms(level[:, :4], level[:, 4], 0.5)])
            scale *= PYRAMID_FACTOR
        if not found:
            return image.new_zeros(0, 5)
        boxes = torch.cat(found)
        boxes = boxes[nms(boxes[:, :4], boxes[:, 4], 0.7)]
        return torch.cat([_square(_regress(boxes[:, :4], boxes[:, 5:9])), boxes[:, 4:5]], 1)

    def _refine(self, image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """R-Net on 24x24 crops: the candidates it keeps, regressed and squared."""
        if not len(boxes):
            return boxes
        offsets, prob = self.nets[1](_normalise(_crops(image, boxes[:, :4], 24)))
        keep = prob >= THRESHOLDS[1]
        boxes, offsets, prob = boxes[keep, :4], offsets[keep], prob[keep]
        order = nms(boxes, prob, 0.7)
        return torch.cat([_square(_regress(boxes[order], offsets[order])), prob[order, None]], 1)

    def _output(self, image: torch.Tensor, boxes: torch.Tensor) -> list[Detection]:
        """O-Net on 48x48 crops: final boxes, landmarks and confidences."""
        if not len(boxes):
            return []
        offsets, points, prob = self.nets[2](_normalise(_crops(image, boxes[:, :4], 48)))
        keep = prob >= THRESHOLDS[2]
        boxes, offsets, points, prob = boxes[keep, :4], offsets[keep], points[keep], prob[keep]
        w, h = (boxes[:, 2] - boxes[:, 0])[:, None], (boxes[:, 3] - boxes[:, 1])[:, None]
        xs, ys = boxes[:, 0:1] + w * points[:, :5], boxes[:, 1:2] + h * points[:, 5:]
        boxes = _regress(boxes, offsets)
        # one face per place: of overlapping boxes the most probable; "min" overlap, as a box
        # inside a larger one is the same face
        order = _nms_min(boxes, prob, 0.7)
        return [
            Detection(tuple(boxes[i].tolist()), float(prob[i]), torch.stack([xs[i], ys[i]], 1).numpy())
            for i in order.tolist()
        ]


def _nms_min(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Non-maximum suppression with overlap = intersection / the smaller box's area."""
    order, kept = scores.argsort(descending=True), []
    area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    while len(order):
        i, rest = order[0], order[1:]
        kept.append(int(i))
        lt = torch.maximum(boxes[i, :2], boxes[rest, :2])
        rb = torch.minimum(boxes[i, 2:], boxes[rest, 2:])
        inter = (rb - lt).clamp(min=0).prod(1)
        overlap = inter / torch.minimum(area[i], area[rest]).clamp(min=1e-9)
        order = rest[overlap <= threshold]
    return torch.tensor(kept, dtype=torch.long)
