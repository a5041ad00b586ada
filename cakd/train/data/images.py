"""Image files read with clear errors: one :class:`DataError` line naming the file that cannot
be decoded, and a check of a validation shard's headers before the first epoch. Shared by the
data sets of :mod:`.datasets` and :mod:`.celeba_spoof`."""
import numpy as np
from PIL import Image

from ...errors import CakdError
from ..distributed import get_rank, get_world_size


class DataError(CakdError):
    """A problem with the data on disk, told in one line: what is wrong and what to do.

    A DataLoader worker's error comes back to the main process as
    ``DataError("Caught DataError in DataLoader worker ...<traceback>...
    cakd.train.data.images.DataError: <line>")``;
    the module-qualified prefix is taken off that last line so it reads as the one clear line.
    """

    def __init__(self, message=""):
        message = str(message).rstrip()
        lines = message.splitlines()
        prefix = f"{type(self).__module__}.{type(self).__qualname__}: "
        if len(lines) > 1 and lines[-1].startswith(prefix):
            lines[-1] = lines[-1][len(prefix) :]
            message = "\n".join(lines)
        super().__init__(message)


def _unreadable(path, error):
    if isinstance(error, Image.DecompressionBombError):
        return DataError(f"image {path} is too large to decode safely ({' '.join(str(error).split())}): "
                         "shrink it or remove it")
    detail = " ".join(str(error).split())
    return DataError(f"cannot read image {path} ({type(error).__name__}: {detail}): remove or replace the file")


# PIL refuses an image of more than twice Image.MAX_IMAGE_PIXELS (about 179 million pixels) and
# warns above it; such an image is one DataError naming it, before the first epoch for validation
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def load_image(path):
    """PIL loader that names the file when it cannot be decoded, instead of a bare PIL error.
    16-bit greyscale (PNG, TIFF: PIL's ``I;16`` and ``I`` modes) is scaled to 8 bits, not
    clipped at 255 (which turns it white)."""
    try:
        with Image.open(path) as img:
            if img.mode.startswith("I"):
                img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257.0).round().clip(0, 255).astype(np.uint8))
            return img.convert("RGB")  # convert() decodes, so truncated files fail here too
    except UNREADABLE as error:
        raise _unreadable(path, error) from None


def check_images(dataset):
    """Open (read the header of, not decode) each image of this rank's validation shard, so that a
    file that is no image stops the run before the first epoch, not after it (its training unsaved).
    A file cut short inside its pixels still passes: only a full decode finds that."""
    for path, _ in getattr(dataset, "samples", [])[get_rank()::get_world_size()]:  # ShardSampler's share
        try:
            with Image.open(path):
                pass
        except UNREADABLE as error:
            raise _unreadable(path, error) from None
