"""The API process stays light: building the app imports no torch and touches no disk."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_building_the_app_imports_no_torch_and_importing_has_no_side_effects(tmp_path):
    code = textwrap.dedent(
        """
        import os, sys
        import service.main
        assert not os.listdir("."), os.listdir(".")  # importing created nothing
        from service.config import Settings
        service.main.create_app(Settings(data_dir="data"))
        loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        assert not loaded, loaded
        assert not hasattr(service.main, "app")
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
