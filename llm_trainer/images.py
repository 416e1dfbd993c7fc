"""Images to pixel values for VLM training and generation.

A *pixel values provider* turns the image paths of a batch into one tensor ``[N, 3, H, W]`` (N = number of paths,
in order), already normalised for the vision encoder. :class:`DefaultPixelValuesProvider` does the usual
SigLIP/CLIP preprocessing with pillow; pass any callable with the same signature to use your own.
"""
from __future__ import annotations

import inspect
import os
from typing import Protocol, Sequence, Union, runtime_checkable

import torch

__all__ = ["PixelValuesProvider", "DefaultPixelValuesProvider", "ImageError", "ImageSource", "load_pixel_values"]

try:  # pillow is a hard dependency, but keep `import llm_trainer.images` cheap to fail clearly.
    from PIL import Image
except ImportError:  # pragma: no cover
    Image = None

ImageSource = Union[str, os.PathLike, "Image.Image"]


class ImageError(ValueError):
    """An image could not be read. ``path`` names the file, ``sample_index`` the dataset sample (if known)."""

    def __init__(self, path: str, reason: str, sample_index: int | None = None):
        self.path, self.reason, self.sample_index = path, reason, sample_index
        where = f" (sample {sample_index})" if sample_index is not None else ""
        super().__init__(f"cannot load image {path!r}{where}: {reason}")


@runtime_checkable
class PixelValuesProvider(Protocol):
    """``provider(image_paths, sample_indices=None) -> Tensor[N, 3, H, W]``.

    ``image_paths`` are the images of a batch in order (several may belong to one sample); ``sample_indices``,
    when given, has the same length and names the dataset sample of each image, for error messages. Raise
    :class:`ImageError` for an image that cannot be read. Implementations that only accept ``image_paths`` are
    fine as well: callers pass ``sample_indices`` only by keyword and fall back when it is not accepted."""

    def __call__(self, image_paths: list[str], sample_indices: Sequence[int] | None = None) -> torch.Tensor: ...


_RESAMPLE = {"bicubic": "BICUBIC", "bilinear": "BILINEAR", "nearest": "NEAREST", "lanczos": "LANCZOS"}
_RESIZE = ("shortest", "squash")


class DefaultPixelValuesProvider:
    """Load (pillow) → RGB → resize → crop → ``[0, 1]`` → ``(x - mean) / std``.

    - ``resize='shortest'``: scale so the shorter side is ``image_size`` (aspect kept), then centre-crop a square;
      ``resize='squash'``: resize straight to ``image_size × image_size`` (what SigLIP's processor does).
    - ``image_root``: relative paths are resolved against it.
    - Images already at the target size are not resampled, so values are exact.
    """

    def __init__(self, image_size: int, mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.5, 0.5, 0.5), resize: str = "shortest", resample: str = "bicubic",
                 image_root: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
        if Image is None:  # pragma: no cover
            raise ImportError("DefaultPixelValuesProvider needs pillow: pip install pillow")
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size <= 0:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if resize not in _RESIZE:
            raise ValueError(f"resize must be one of {_RESIZE}, got {resize!r}")
        if resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {tuple(_RESAMPLE)}, got {resample!r}")
        mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {mean} and {std}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {std}")
        self.image_size, self.resize, self.resample = image_size, resize, resample
        self.mean, self.std = mean, std
        self.image_root = os.fspath(image_root) if image_root is not None else None
        self.dtype = dtype
        self._mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self._std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    @classmethod
    def from_vision_config(cls, config, **kwargs) -> "DefaultPixelValuesProvider":
        """Use a :class:`~llm_trainer.model.vision.VisionConfig` (or a ``VLMConfig``) for size, mean and std."""
        vision = getattr(config, "vision_config", config)
        return cls(vision.image_size, mean=vision.image_mean, std=vision.image_std, **kwargs)

    def __repr__(self) -> str:
        return (f"DefaultPixelValuesProvider(image_size={self.image_size}, mean={self.mean}, std={self.std}, "
                f"resize={self.resize!r}, resample={self.resample!r})")

    def _resolve(self, path: str) -> str:
        path = os.fspath(path)
        if self.image_root is not None and not os.path.isabs(path):
            return os.path.join(self.image_root, path)
        return path

    def load(self, source: ImageSource, sample_index: int | None = None) -> "Image.Image":
        """The image as RGB pillow image, or :class:`ImageError` naming the file (and sample)."""
        if Image is not None and isinstance(source, Image.Image):
            return source.convert("RGB")
        path = self._resolve(source)
        if not os.path.exists(path):
            raise ImageError(path, "file not found", sample_index)
        try:
            with Image.open(path) as img:
                img.load()  # decode now: a truncated file fails here, not later
                return img.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise ImageError(path, f"not a readable image ({type(exc).__name__}: {exc})", sample_index) from exc

    def transform(self, img: "Image.Image") -> torch.Tensor:
        """RGB pillow image → normalised ``[3, image_size, image_size]`` float tensor."""
        s = self.image_size
        resample = getattr(Image.Resampling, _RESAMPLE[self.resample])
        w, h = img.size
        if self.resize == "squash":
            if (w, h) != (s, s):
                img = img.resize((s, s), resample=resample)
        else:
            scale = s / min(w, h)
            nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
            if (nw, nh) != (w, h):
                img = img.resize((nw, nh), resample=resample)
            left, top = (nw - s) // 2, (nh - s) // 2
            if (nw, nh) != (s, s):
                img = img.crop((left, top, left + s, top + s))
        data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(s, s, 3)
        x = data.permute(2, 0, 1).to(torch.float32) / 255.0
        return ((x - self._mean_t) / self._std_t).to(self.dtype)

    def __call__(self, image_paths: Sequence[ImageSource],
                 sample_indices: Sequence[int] | None = None) -> torch.Tensor:
        if sample_indices is not None and len(sample_indices) != len(image_paths):
            raise ValueError(f"sample_indices has {len(sample_indices)} entries for {len(image_paths)} images")
        if len(image_paths) == 0:
            return torch.empty(0, 3, self.image_size, self.image_size, dtype=self.dtype)
        out = []
        for i, source in enumerate(image_paths):
            idx = None if sample_indices is None else int(sample_indices[i])
            out.append(self.transform(self.load(source, idx)))
        return torch.stack(out)


def _accepts_sample_indices(provider) -> bool:
    try:
        params = inspect.signature(provider).parameters
    except (TypeError, ValueError):
        return False
    return "sample_indices" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def load_pixel_values(provider, image_paths: Sequence[ImageSource], sample_indices: Sequence[int] | None = None,
                      image_size: int | None = None) -> torch.Tensor:
    """Call ``provider`` for a batch's images (passing ``sample_indices`` if it takes them) and check the result:
    a float tensor ``[len(image_paths), 3, H, W]`` (``H = W = image_size`` when given). For trainers."""
    if sample_indices is not None and _accepts_sample_indices(provider):
        out = provider(list(image_paths), sample_indices=list(sample_indices))
    else:
        out = provider(list(image_paths))
    name = getattr(provider, "__name__", type(provider).__name__)
    if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[0] != len(image_paths) \
            or out.shape[1] != 3 or not out.is_floating_point():
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"pixel values provider {name} returned {got}; expected a float tensor "
                         f"[{len(image_paths)}, 3, H, W] for {len(image_paths)} image paths")
    if image_size is not None and tuple(out.shape[2:]) != (image_size, image_size):
        raise ValueError(f"pixel values provider {name} returned {out.shape[2]}x{out.shape[3]} images; the "
                         f"vision encoder expects {image_size}x{image_size}")
    return out
