"""Commands that run no model start light: no torch or timm import in `labeler datasets list`,
`labeler store verify`, or the API process (which lists timm's models in a child process)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from labeler_service.sample import make_sample_images
from storage import Store
from tests.service.conftest import REDIS_URL

CHECK = """
import sys
from click.testing import CliRunner
from fastapi.testclient import TestClient

from labeler_service.api.main import create_app
from labeler_service.cli import main
from labeler_service.settings import Settings

store, root = sys.argv[1], sys.argv[2]
for args in (["datasets", "list"], ["store", "verify"]):
    result = CliRunner().invoke(main, [*args, "--store", store])
    assert result.exit_code == 0, result.output
settings = Settings(store=store, data_root=root + "/data", checkpoint_root=root,
                    redis_url=sys.argv[3], api_keys="k")
with TestClient(create_app(settings), headers={"Authorization": "Bearer k"}) as client:
    assert client.get("/healthz").status_code == 200
    job = {"dataset": "toy", "topk": 2, "teacher": {"model": "no_such_model",
           "checkpoint": "ckpt.pt", "input_size": 64}}
    r = client.post("/v1/jobs", json=job)
    assert r.status_code == 422 and "unknown timm model" in r.text, r.text
heavy = sorted(m for m in ("torch", "timm", "torchvision") if m in sys.modules)
assert not heavy, heavy
"""


def test_commands_and_the_api_import_no_torch(tmp_path: Path):
    make_sample_images(tmp_path / "data" / "toy", per_class=2)
    Store.open(tmp_path / "store").add_dataset("toy", tmp_path / "data" / "toy")
    (tmp_path / "ckpt.pt").write_bytes(b"\x80\x02fake pickle: the model check comes later")
    proc = subprocess.run([sys.executable, "-c", CHECK, str(tmp_path / "store"), str(tmp_path),
                           REDIS_URL], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
