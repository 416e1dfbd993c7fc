import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def small_disk(tmp_path, request):
    """A real small tmpfs (``@pytest.mark.parametrize("small_disk", ["4m"], indirect=True)`` sets its size;
    default 4 MiB). Mounting needs root, as CI has; skipped elsewhere."""
    import os
    import subprocess
    size = getattr(request, "param", "4m")
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
