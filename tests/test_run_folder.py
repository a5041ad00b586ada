"""Nothing run, nothing lost, nothing silently wrong (issue 20): hostile files, the run folder's
lock, resumes that change flags, diverged states, disk full, Ctrl-C. Tiny in-process runs."""
import os
import pickle

import pytest

from make_image_folder import make_image_folder
from test_train import run_main, small_flags


class Payload:
    """A pickle that runs ``touch MARKER`` when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def hostile_file(path, marker):
    with open(path, "wb") as f:
        pickle.dump({"model": Payload(marker)}, f, protocol=2)  # torch.save's protocol
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("data")), num_classes=3, train_per_class=8, val_per_class=3, size=72)


@pytest.mark.parametrize("flag", ["--weights", "--teacher-weights"])
def test_hostile_weights_are_one_line_and_do_not_run(flag, data, tmp_path, capsys):
    marker = tmp_path / "ran"
    weights = hostile_file(str(tmp_path / "w.pth"), marker)
    code, err = run_main(small_flags("cakd", data, str(tmp_path / "out"), epochs=1) + [flag, weights], capsys)
    assert code == 1 and len(err) == 1, err
    assert f"weights file {weights} cannot be read (it holds objects other than tensors" in err[0] and "posix.system" in err[0]
    assert "weights_only" not in err[0] and not marker.exists()
