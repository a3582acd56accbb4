"""python -m lightning_gradguard report: one HTML page from a real run's event files."""

from __future__ import annotations

import base64
import io
import re
import subprocess
import sys

import lightning.pytorch as pl
from helpers import RecordingMLP, loader, make_trainer, read_scalars
from PIL import Image
from test_flow import DeepSigmoid

from lightning_gradguard import GradientNormLogger
from lightning_gradguard.callbacks import _session


class Finder(pl.Callback):
    """Writes a finding to the Text tab the way the alarm does (``_session.log_text``)."""

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 10:
            _session.log_text(trainer, "alarm/findings", "**vanishing** at step 9: `body.0` 1e-9 vs `head` 0.1", 9)


def _report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lightning_gradguard", "report", *args], capture_output=True, text=True, timeout=120
    )


def test_report_of_a_real_run_holds_pictures_findings_and_the_layer_table(tmp_path):
    cb = GradientNormLogger(flow_every_n_steps=10)
    trainer = make_trainer(tmp_path / "logs", [cb, Finder()], max_steps=20, log_every_n_steps=5)
    trainer.fit(DeepSigmoid(), loader(n=256))
    out = tmp_path / "report.html"
    done = _report(str(tmp_path / "logs"), "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert str(out) in done.stdout
    page = out.read_text()
    assert "<script" not in page and 'src="http' not in page, "self-contained"
    pictures = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', page)
    assert [tag for tag, _ in pictures] == ["grad_flow/heatmap", "grad_flow/profile"]
    for _, data in pictures:
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        assert image.width >= 1000 and image.height >= 400
    assert "<b>alarm/findings</b>, step 9" in page
    assert "<strong>vanishing</strong> at step 9: <code>body.0</code>" in page, "the markdown is rendered"
    # the per-layer table: forward order (the head is registered first but runs last), first/last/min/max
    rows = re.findall(r"<tr(?: class=low)?><td>([^<]+)</td><td>([^ ]+) \((\d+)\)</td><td>([^ ]+) \((\d+)\)</td>", page)
    layers = [r[0] for r in rows if r[0] != "total"]
    assert layers[0] == "body.0" and layers[-1] == "head" and len(layers) == 10, layers
    scalars = read_scalars(trainer.logger.log_dir)
    by_name = {r[0]: r for r in rows}
    first = scalars["grad_norm/body.0"]
    assert by_name["body.0"][1:] == (f"{first[4]:.3g}", "4", f"{first[19]:.3g}", "19")
    assert "class=low><td>body.0<" in page, "a layer 1000x below the largest is marked"


def test_default_output_goes_into_the_log_folder(tmp_path):
    trainer = make_trainer(tmp_path, [GradientNormLogger(flow_every_n_steps=None)], max_steps=3)
    trainer.fit(RecordingMLP(), loader())
    done = _report(trainer.logger.log_dir)
    assert done.returncode == 0, done.stderr
    page = (tmp_path / "tb" / "version_0" / "gradguard_report.html").read_text()
    assert "<td>net.0</td>" in page and "<td>total</td>" in page
    assert "Nothing was written to the Text tab" in page, "no alarm attached: said, not left blank"


def test_clear_errors_for_folders_without_gradguard_data(tmp_path):
    done = _report(str(tmp_path / "missing"))
    assert done.returncode == 1 and "is not a folder" in done.stderr
    (tmp_path / "empty").mkdir()
    done = _report(str(tmp_path / "empty"))
    assert done.returncode == 1 and "No TensorBoard event file" in done.stderr
    trainer = make_trainer(tmp_path / "plain", [], max_steps=3)  # a run that logged only the loss
    trainer.fit(RecordingMLP(), loader())
    done = _report(str(tmp_path / "plain"))
    assert done.returncode == 1 and "no gradguard data" in done.stderr and "GradientNormLogger" in done.stderr
    assert "Traceback" not in done.stderr
