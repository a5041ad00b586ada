"""Weights in and out: import of the released code's checkpoint layout, export of a plain
torchvision student, strict loading told in one line, atomic saving, and torchvision's
weights files read from torch's hub cache with their hash checked."""
import contextlib
import hashlib
import os
import pickle
import re
import tempfile
import textwrap

import torch

from .errors import CakdError

_GL_KEY = re.compile(r"gl_proj\.layers\.fc_layer_(\d+)\.(weight|bias)$")
_PROJECTOR_PREFIXES = ("pca_proj.", "gl_proj.", "cls_proj.")


def strip_prefix(state_dict, prefix="module."):
    """``state_dict`` without ``prefix`` (DDP's ``module.``) when every key has it; a copy as it is otherwise."""
    if all(key.startswith(prefix) for key in state_dict):
        return {key[len(prefix) :]: value for key, value in state_dict.items()}
    return dict(state_dict)


def split_reference_state_dict(state_dict):
    """Split the released ``checkpoint["model"]`` into our layout.

    Returns ``(student, projectors)``: the torchvision student's keys as they are, and
    the projector keys renamed to ``StudentWithProjectors`` (the 16 group Linears stacked
    into ``gl_proj.weight`` / ``gl_proj.bias``; the never-used ``pca_proj.to_out`` dropped).
    """
    state_dict = strip_prefix(state_dict)
    student = {k: v for k, v in state_dict.items() if not k.startswith(_PROJECTOR_PREFIXES)}
    projectors = {}
    groups = {}
    for key, value in state_dict.items():
        if key.startswith("pca_proj.to_out."):
            continue
        match = _GL_KEY.match(key)
        if match:
            groups.setdefault(match.group(2), {})[int(match.group(1))] = value
        elif key.startswith(_PROJECTOR_PREFIXES):
            projectors[key] = value
    for kind, by_index in groups.items():
        if sorted(by_index) != list(range(len(by_index))):
            raise ValueError(f"released checkpoint has gaps in gl_proj.layers.fc_layer_*.{kind}: {sorted(by_index)}")
        projectors[f"gl_proj.{kind}"] = torch.stack([by_index[i] for i in range(len(by_index))])
    return student, projectors


class StateMismatch(CakdError, ValueError):
    """A state dict that does not fit its module, told in one line: what, the detail, the fix."""


def load_strict(module, state, what, fix):
    """``module.load_state_dict(state, strict=True)`` whose failure is one :class:`StateMismatch`
    line: what did not fit, the first detail torch gives, and what to do."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        details = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
        detail = textwrap.shorten(details[0] if details else "state dict mismatch", 160, placeholder=" ...")
        raise StateMismatch(f"{what} ({detail}): {fix}") from None


def load_reference_state_dict(distiller, state_dict, discriminator_state_dict=None):
    """Load the released layout into ``distiller``, strictly: student and projector keys must
    be exactly this distiller's (a projector left out would stay random without a word)."""
    student, projectors = split_reference_state_dict(state_dict)
    name = type(distiller.student).__name__
    load_strict(distiller.student, student, f"checkpoint does not fit the {name} student", "check --student and the class count")
    trainable = distiller.trainable
    expected = {k for k in trainable.state_dict() if k.startswith(_PROJECTOR_PREFIXES)}
    if set(projectors) != expected:
        missing, unexpected = sorted(expected - set(projectors)), sorted(set(projectors) - expected)
        raise ValueError(
            f"checkpoint projector keys do not match this distiller's (missing: {', '.join(missing) or 'none'}; "
            f"unexpected: {', '.join(unexpected) or 'none'}): build the distiller with the switches it was trained with"
        )
    if expected:
        load_strict(trainable, trainable.joined(student, projectors), "checkpoint projectors do not fit", "check the distiller's switches")
    if discriminator_state_dict is not None:
        if distiller.discriminator is None:
            raise ValueError("a discriminator state was given but this recipe has no discriminator")
        load_strict(distiller.discriminator, strip_prefix(discriminator_state_dict), "the discriminator does not fit", "check disc_form")


def export_student(model):
    """The student alone as a plain torchvision state dict (loads with ``strict=True``).

    ``model``: a distiller, a ``StudentWithProjectors``, or the student module itself.
    """
    student = getattr(model, "student", model)
    return {key: value.detach().clone() for key, value in student.state_dict().items()}


@contextlib.contextmanager
def _staging(path, suffix, mode):
    """``(file object, name)`` of a temporary file in ``path``'s folder, synced when the block
    ends; removed if anything fails before (a crash leaves a ``.tmp-*`` file, which the trainer
    removes from its run folder at the next start). The file gets the mode a plain ``open``
    would give it (the user's umask), not the temporary file's private 0600."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, mode) as f:
            yield f, tmp
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def _replacing(path, suffix, mode):
    """A file object (:func:`_staging`) that replaces ``path`` once written whole and synced."""
    with _staging(path, suffix, mode) as (f, tmp):
        yield f
    os.replace(tmp, path)


def stage_text(path, text):
    """``text`` written whole and synced to a temporary file beside ``path``; returns its name:
    ``os.replace`` it over ``path`` to publish it (a rename needs no space), or remove it."""
    with _staging(path, ".txt", "w") as (f, tmp):
        f.write(text)
    return tmp


def write_text_atomic(path, text):
    """Write ``text`` to ``path`` atomically: readers see the old file or the new one, never a part."""
    os.replace(stage_text(path, text), path)


def save_atomic(obj, path):
    """``torch.save`` to a temporary file in the same folder, then rename: a crash mid-write
    never leaves a truncated checkpoint behind. A write that fails inside torch's writer (which
    reports it as ``[enforce fail at inline_container.cc ...] unexpected pos``) is an OSError
    that says how much room the disk has left."""
    with _replacing(path, ".pth", "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as error:
            if "inline_container" not in str(error):
                raise
            folder = os.statvfs(os.path.dirname(os.path.abspath(path)))
            free = folder.f_bavail * folder.f_frsize / 2**20
            raise OSError(f"the write stopped part-way, {free:.0f} MiB free on that disk (a full disk?)") from None


def load_error(error):
    """Why ``torch.load(..., weights_only=True)`` failed, in one line.

    For a file holding objects other than tensors torch's message advises ``weights_only=False``,
    which would run whatever code the file carries: that advice is left out, the object it
    refused is kept."""
    if isinstance(error, pickle.UnpicklingError):
        noise = ("Weights only load failed", "Please file an issue", "Check the documentation")
        lines = [line.strip() for line in str(error).splitlines() if line.strip() and not line.strip().startswith(noise)]
        detail = " ".join(lines).replace("WeightsUnpickler error:", "").strip() or "an object that is not a tensor"
        return f"it holds objects other than tensors, not loaded since that could run code: {detail}"
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"  # whole: a cut word misleads


def load_torchvision_weights(name: str, weights: str, url: str, progress: bool = True) -> dict:
    """A torchvision weights file from torch's hub cache (downloaded there once), read with
    ``weights_only=True`` after its SHA-256 is checked against the prefix its name carries.

    torchvision's own ``get_state_dict`` checks the hash only on download and unpickles a
    cached file with ``weights_only=False``: a file placed in the cache could run code."""
    target = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    found = re.search(torch.hub.HASH_REGEX, os.path.basename(url))
    prefix = found.group(1) if found else None
    if not os.path.isfile(target):
        try:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            torch.hub.download_url_to_file(url, target, hash_prefix=prefix, progress=progress)
        except Exception as error:  # URLError, socket errors, hash mismatch: all mean "no usable file"
            raise RuntimeError(
                f"could not download {name} {weights} weights from {url} ({type(error).__name__}: {error}); "
                f"offline, put that file at {target} or pass a local .pth path as the weights"
            ) from None
    if prefix and not sha256_of(target).startswith(prefix):
        raise ValueError(
            f"{target} is not the {name} {weights} file: its SHA-256 does not start with {prefix}, as its name says; "
            "delete it (it is downloaded again) or put the file from " + url + " there"
        )
    try:
        return torch.load(target, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{target} cannot be read ({load_error(error)}): delete it, it is downloaded again") from None


def sha256_of(path: str) -> str:
    """The hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
