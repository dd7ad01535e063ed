"""Prediction sampling (serving/sampling.py), drift metrics (serving/drift_metrics.py) and the drift
command (serving/drift.py): records are complete, bounded and removed by retention; several
processes write one store at once; sampling never fails or blocks a request; the export is an image
folder the trainer reads; the drift command reports a shift and stays quiet without one.

The shifted-stream drill against a real gunicorn gateway is tests/drills/test_drift.py.
"""

from __future__ import annotations

import io
import json
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from flask import Flask
from PIL import Image
from prometheus_client import REGISTRY

from serving import drift, drift_metrics, sampling
from serving.backends.base import Prediction
from serving.config import ConfigError, Settings
from serving.sampling import Sampler, SampleStore

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def metric(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def traffic(
    seed: int, n: int, *, favourite: int | None = None, darken: float = 1.0, ood_shift: float = 0.0
) -> tuple[np.ndarray, Prediction]:
    """n images and the prediction a model would give them: a stand-in population with a knob for
    each kind of shift (one class favoured, darker pixels, higher ood scores)."""
    rng = np.random.default_rng(seed)
    images = np.clip(rng.normal(120, 55, size=(n, 32, 32, 3)) * darken, 0, 255).astype(np.uint8)
    logits = rng.normal(0, 2.0, size=(n, len(CLASSES)))
    if favourite is not None:
        logits[:, favourite] += 6.0
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    ood = (rng.normal(-8, 1.5, size=n) + ood_shift).astype(np.float32)
    prediction = Prediction(probabilities.astype(np.float32), CLASSES, "cifar10", 3, ood_score=ood,
                            abstain=ood > -5.0)  # fmt: skip
    return images, prediction


def write_reference(model_dir: Path, seed: int = 1000, n: int = 2000) -> Path:
    """reference_stats.json in the documented format (as the export writes it) for `traffic`."""
    images, p = traffic(seed, n)
    data = drift.reference_from_predictions(
        p.probabilities, CLASSES, images, ood_score=p.ood_score, abstain=p.abstain
    )
    path = model_dir / "assets.extra" / "reference_stats.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def fill(directory: Path, batches: list[tuple[np.ndarray, Prediction]], **kwargs) -> Sampler:
    sampler = Sampler(directory, 1.0, max_records=kwargs.pop("max_records", 100_000),
                      retention_hours=kwargs.pop("retention_hours", 24.0), **kwargs)  # fmt: skip
    for i, (images, prediction) in enumerate(batches):
        assert sampler.record(images, prediction, f"req-{i}")
    assert sampler.flush(30)
    sampler.close()  # the writer thread ends and closes its connection
    return sampler


# --------------------------------------------------------------------------------------------------
# Settings


def test_sampling_is_off_by_default_and_read_from_the_environment(tmp_path: Path) -> None:
    assert Settings.from_env({}).sample_rate == 0
    s = Settings.from_env({
        "GATEWAY_SAMPLE_RATE": "0.05", "GATEWAY_SAMPLE_DIR": str(tmp_path),
        "GATEWAY_SAMPLE_MAX_RECORDS": "500", "GATEWAY_SAMPLE_RETENTION_HOURS": "12",
    })  # fmt: skip
    assert (s.sample_rate, s.sample_dir, s.sample_max_records, s.sample_retention_hours) == (
        0.05, tmp_path, 500, 12.0
    )


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"GATEWAY_SAMPLE_RATE": "1.5", "GATEWAY_SAMPLE_DIR": "/tmp/x"}, "GATEWAY_SAMPLE_RATE"),
        ({"GATEWAY_SAMPLE_RATE": "half", "GATEWAY_SAMPLE_DIR": "/tmp/x"}, "GATEWAY_SAMPLE_RATE"),
        ({"GATEWAY_SAMPLE_RATE": "0.1"}, "GATEWAY_SAMPLE_DIR"),
        ({"GATEWAY_SAMPLE_MAX_RECORDS": "0"}, "GATEWAY_SAMPLE_MAX_RECORDS"),
        ({"GATEWAY_SAMPLE_RETENTION_HOURS": "-1"}, "GATEWAY_SAMPLE_RETENTION_HOURS"),
    ],
)
def test_bad_sampling_settings_name_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        Settings.from_env(env)


# --------------------------------------------------------------------------------------------------
# The store and the sampler


def test_records_are_complete(tmp_path: Path) -> None:
    images, prediction = traffic(1, 3)
    before = time.time()
    fill(tmp_path, [(images, prediction)])
    with SampleStore(tmp_path, create=False) as store:
        records = list(store.records())
    assert [r.image_index for r in records] == [0, 1, 2]
    for i, r in enumerate(records):
        assert r.request_id == "req-0" and before <= r.time <= time.time()
        assert (r.model_name, r.model_version, r.class_names) == ("cifar10", 3, CLASSES)
        np.testing.assert_array_equal(r.image, images[i])
        np.testing.assert_array_equal(r.probabilities, prediction.probabilities[i])
        top = int(prediction.probabilities[i].argmax())
        assert r.label == CLASSES[top] and r.confidence == pytest.approx(prediction.probabilities[i, top])
        assert r.ood_score == pytest.approx(float(prediction.ood_score[i]))
        assert r.abstain is bool(prediction.abstain[i])
    # Owner-only: the files hold users' images (SQLite's -wal and -shm files too).
    with SampleStore(tmp_path / "new") as store:
        store.insert(sampling.rows_for(images, prediction, "r", time.time()))
        files = list((tmp_path / "new").glob(sampling.SAMPLE_FILE + "*"))
        assert len(files) == 3 and all(f.stat().st_mode & 0o077 == 0 for f in files), files
    assert (tmp_path / "new").stat().st_mode & 0o077 == 0


def test_versions_without_ood_outputs_are_stored_with_nulls(tmp_path: Path) -> None:
    images, p = traffic(2, 2)
    fill(tmp_path, [(images, Prediction(p.probabilities, CLASSES, "cifar10", 1))])
    with SampleStore(tmp_path, create=False) as store:
        assert [(r.ood_score, r.abstain) for r in store.records()] == [(None, None), (None, None)]


def test_the_rate_keeps_that_share_of_requests(tmp_path: Path) -> None:
    images, prediction = traffic(3, 1)
    sampler = Sampler(tmp_path, 0.25, max_records=10_000, retention_hours=1, seed=7)
    kept = sum(sampler.record(images, prediction, f"r{i}") for i in range(800))
    assert sampler.flush(30)
    # Binomial(800, 0.25): mean 200, sd 12; 5 sd either way.
    assert 140 <= kept <= 260
    with SampleStore(tmp_path, create=False) as store:
        assert store.count() == kept


def test_sampling_off_stores_nothing(tmp_path: Path) -> None:
    app = Flask(__name__)
    from serving import context

    sample_dir = tmp_path / "samples"
    context.install(app, Settings(sample_rate=0.0, sample_dir=sample_dir), backend=None)  # type: ignore[arg-type]
    images, prediction = traffic(4, 2)
    with app.app_context():
        sampling.record(images, prediction, "r1")
    assert sampling.app_sampler(app) is None
    assert not sample_dir.exists()


def test_the_store_keeps_the_newest_records_up_to_the_bound(tmp_path: Path) -> None:
    batches = [traffic(10 + i, 2) for i in range(40)]  # 80 images
    fill(tmp_path, batches, max_records=25)
    with SampleStore(tmp_path, create=False) as store:
        records = list(store.records())
    assert len(records) == 25
    # The newest 25 images: the last 12 requests whole and one image of the request before them.
    assert [(r.request_id, r.image_index) for r in records][-24:] == [
        (f"req-{i}", j) for i in range(28, 40) for j in (0, 1)
    ]


def test_the_file_stays_at_the_bound_however_much_is_written(tmp_path: Path) -> None:
    sizes = []
    for round_ in range(3):  # 3 x 1600 images into a bound of 500
        fill(tmp_path, [traffic(100 * round_ + i, 16) for i in range(100)], max_records=500)
        with SampleStore(tmp_path, create=False) as store:
            assert store.count() == 500
            store.checkpoint()
        sizes.append((tmp_path / sampling.SAMPLE_FILE).stat().st_size)
    assert sizes[0] == sizes[1] == sizes[2], sizes
    assert sizes[0] <= 500 * 4400 + 64 * 1024, f"{sizes[0] / 500:.0f} bytes per record"


def test_retention_removes_old_records(tmp_path: Path) -> None:
    images, prediction = traffic(5, 2)
    marked = np.full_like(images, 0xA7)  # a byte pattern nothing else in the file has
    now = time.time()
    with SampleStore(tmp_path, retention_hours=1.0) as store:
        store.insert(sampling.rows_for(marked, prediction, "old", now - 3 * 3600))
        store.checkpoint()
    assert marked[0].tobytes() in (tmp_path / sampling.SAMPLE_FILE).read_bytes()
    with SampleStore(tmp_path, retention_hours=1.0) as store:
        store.insert(sampling.rows_for(images, prediction, "recent", now - 600))
        assert store.count() == 4
    # The gateway's writer applies retention when it starts writing (and every minute after).
    fill(tmp_path, [(images, prediction)], retention_hours=1.0)
    with SampleStore(tmp_path, create=False) as store:
        assert sorted({r.request_id for r in store.records()}) == ["recent", "req-0"]
        store.insert(sampling.rows_for(images, prediction, "old-again", now - 5 * 3600))
    # ... and so does the prune command, with the gateway's GATEWAY_SAMPLE_RETENTION_HOURS or its flag.
    assert sampling.main(["prune", "--dir", str(tmp_path), "--retention-hours", "1"]) == 0
    with SampleStore(tmp_path, create=False) as store:
        assert "old-again" not in {r.request_id for r in store.records()}
    # secure_delete: the removed images are overwritten in the file, not only unlinked from the table.
    stored = b"".join(p.read_bytes() for p in tmp_path.glob(sampling.SAMPLE_FILE + "*"))
    assert marked[0].tobytes()[:256] not in stored


def test_delete_erases_one_request_or_everything(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fill(tmp_path, [traffic(6, 2), traffic(7, 3)])
    assert sampling.main(["delete", "--dir", str(tmp_path), "--request-id", "req-0"]) == 0
    with SampleStore(tmp_path, create=False) as store:
        assert {r.request_id for r in store.records()} == {"req-1"}
    running = Sampler(tmp_path, 1.0, max_records=100, retention_hours=1)  # a gateway worker's, still open
    running.record(*traffic(8, 1), "before")
    assert running.flush(10)
    assert sampling.main(["delete", "--dir", str(tmp_path), "--all"]) == 0
    with SampleStore(tmp_path, create=False) as store:
        assert store.count() == 0
    # The running writer goes on writing into the file the commands read.
    running.record(*traffic(9, 1), "after")
    assert running.flush(10)
    running.close()
    with SampleStore(tmp_path, create=False) as store:
        assert [r.request_id for r in store.records()] == ["after"]
    assert sampling.main(["stats", "--dir", str(tmp_path / "elsewhere")]) == 2
    assert "no prediction sample" in capsys.readouterr().err


WRITER = textwrap.dedent("""
    import sys, numpy as np
    from pathlib import Path
    from prometheus_client import REGISTRY
    from serving.backends.base import Prediction
    from serving.sampling import Sampler
    directory, tag = Path(sys.argv[1]), sys.argv[2]
    sampler = Sampler(directory, 1.0, max_records=100_000, retention_hours=1)
    probs = np.full((2, 10), 0.1, np.float32)
    images = np.zeros((2, 32, 32, 3), np.uint8)
    for i in range(150):
        sampler.record(images, Prediction(probs, tuple("abcdefghij"), "m", 1), f"{tag}-{i}")
        if i % 10 == 0:
            sampler.flush(30)  # many small transactions: the processes contend for the write lock
    assert sampler.flush(60)
    errors = sum(s.value for m in REGISTRY.collect() if m.name == "gateway_sample_errors" for s in m.samples
                 if s.name.endswith("_total"))
    print(int(errors))
""")


def test_several_worker_processes_write_one_store_at_once(tmp_path: Path, project_root: Path) -> None:
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), f"w{k}"], cwd=project_root,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for k in range(4)
    ]  # fmt: skip
    outputs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err
        assert out.strip() == "0", f"a writer lost samples: {out} {err}"
    with SampleStore(tmp_path, create=False) as store:
        assert store.count() == 4 * 150 * 2
        ids = {r.request_id for r in store.records()}
        assert ids == {f"w{k}-{i}" for k in range(4) for i in range(150)}
        assert store._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_failing_store_never_fails_or_blocks_a_request(tmp_path: Path) -> None:
    images, prediction = traffic(8, 2)
    # An unusable directory (a file is in the way): counted and logged, never raised.
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("")
    before = metric("gateway_sample_errors_total", {"reason": "write_failed"})
    sampler = Sampler(blocked, 1.0, max_records=10, retention_hours=1)
    sampler.record(images, prediction, "r")
    assert sampler.flush(10)
    assert metric("gateway_sample_errors_total", {"reason": "write_failed"}) - before == 2

    # A writer stuck behind another process's lock: record() neither waits nor fails; what does not
    # fit the queue is dropped and counted.
    SampleStore(tmp_path / "busy").close()
    holder = sqlite3.connect(tmp_path / "busy" / sampling.SAMPLE_FILE, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    dropped_before = metric("gateway_sample_errors_total", {"reason": "queue_full"})
    sampler = Sampler(tmp_path / "busy", 1.0, max_records=1000, retention_hours=1, queue_size=5)
    started = time.perf_counter()
    for i in range(50):
        sampler.record(images, prediction, f"r{i}")
    elapsed = time.perf_counter() - started
    assert elapsed < 0.5, f"50 record() calls took {elapsed:.2f} s behind a locked store"
    assert metric("gateway_sample_errors_total", {"reason": "queue_full"}) - dropped_before >= 2 * 40
    holder.execute("ROLLBACK")
    holder.close()
    assert sampler.flush(30)
    with SampleStore(tmp_path / "busy", create=False) as store:
        # What the queue held, and the one batch (at most a full queue) the writer had in its hands.
        assert 2 * 5 <= store.count() <= 2 * 10

    # A malformed prediction loses its own sample only.
    bad = Prediction(np.zeros((3, 10), np.float32), CLASSES, "cifar10", 1)
    before = metric("gateway_sample_errors_total", {"reason": "bad_prediction"})
    sampler.record(images, bad, "mismatched")
    assert sampler.flush(10)
    assert metric("gateway_sample_errors_total", {"reason": "bad_prediction"}) - before == 2


# --------------------------------------------------------------------------------------------------
# Export for relabelling


def test_export_writes_an_image_folder_the_trainer_reads(tmp_path: Path) -> None:
    from trainer.data import imagefolder, load_dataset

    batches = [traffic(20 + i, 3) for i in range(20)]
    fill(tmp_path / "s", batches)
    out = tmp_path / "relabel"
    assert sampling.main(["export", "--dir", str(tmp_path / "s"), "--out", str(out)]) == 0
    manifest = (out / "manifest.csv").read_text().splitlines()
    assert len(manifest) == 1 + 60 and manifest[0].startswith("file,split,predicted_label,confidence")
    files = sorted(out.glob("*/*/*.png"))
    assert len(files) == 60 and {f.parent.parent.name for f in files} == {"train", "test"}
    # Every class has a folder in both splits, so a relabeller only moves files.
    for split in ("train", "test"):
        assert sorted(d.name for d in (out / split).iterdir()) == sorted(CLASSES)
    # Pixels survive exactly (PNG) and each file sits under its predicted label.
    by_name = {f.name: f for f in files}
    for i, (images, prediction) in enumerate(batches):
        for j in range(3):
            path = by_name[f"req-{i}-{j}.png"]
            assert path.parent.name == CLASSES[int(prediction.probabilities[j].argmax())]
            np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), images[j])
    raw = imagefolder.load(out)  # what `python -m trainer train --dataset imagefolder` reads
    assert raw.class_names == tuple(sorted(CLASSES))
    assert len(raw.x_train) + len(raw.x_test) == 60 and len(raw.x_test) > 0
    dataset = load_dataset("imagefolder", data_dir=str(out))  # the trainer's entry, splits and stats
    assert dataset.class_names == tuple(sorted(CLASSES))
    # Nothing is overwritten.
    assert sampling.main(["export", "--dir", str(tmp_path / "s"), "--out", str(out)]) == 2


# --------------------------------------------------------------------------------------------------
# Drift


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "models" / "cifar10" / "3"
    write_reference(d)
    return d


def drift_cli(samples: Path, model_dir: Path, *extra: str) -> tuple[int, str]:
    out = io.StringIO()
    import contextlib

    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        rc = sampling.main(["drift", "--dir", str(samples), "--model-dir", str(model_dir), *extra])
    return rc, out.getvalue()


def test_drift_stays_quiet_on_traffic_like_the_reference(tmp_path: Path, model_dir: Path) -> None:
    fill(tmp_path / "s", [traffic(100 + i, 10) for i in range(30)])
    rc, out = drift_cli(tmp_path / "s", model_dir)
    assert rc == 0, out
    assert "no drift found" in out and "MOVED" not in out


@pytest.mark.parametrize(
    ("shift", "moved"),
    [
        ({"favourite": 4}, ["class share", "confidence"]),
        ({"darken": 0.4}, ["pixel mean (reference)", "pixel std (reference)"]),
        ({"ood_shift": 5.0}, ["ood_score", "abstain rate"]),
    ],
)
def test_drift_reports_what_moved(tmp_path: Path, model_dir: Path, shift: dict, moved: list[str]) -> None:
    fill(tmp_path / "s", [traffic(200 + i, 10, **shift) for i in range(30)])
    rc, out = drift_cli(tmp_path / "s", model_dir)
    assert rc == 1, out
    for name in moved:
        assert any(line.strip().startswith(name) and "MOVED" in line for line in out.splitlines()), out
    assert out.strip().splitlines()[-1].startswith("DRIFT:")
    report = json.loads(drift_cli(tmp_path / "s", model_dir, "--json")[1])
    assert report["drifted"] and set(moved) <= set(report["moved"])


def test_drift_compares_pixels_with_the_training_split_too(tmp_path: Path, model_dir: Path) -> None:
    fill(tmp_path / "s", [traffic(300 + i, 10) for i in range(10)])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # A training split much brighter than what is served (and than the reference).
    (run_dir / "dataset.json").write_text(json.dumps({"mean": [200, 200, 200], "std": [55, 55, 55]}))
    rc, out = drift_cli(tmp_path / "s", model_dir, "--run-dir", str(run_dir))
    assert rc == 1
    assert [line for line in out.splitlines() if "pixel mean (training split)" in line and "MOVED" in line]
    assert not [line for line in out.splitlines() if "pixel mean (reference)" in line and "MOVED" in line]


def test_drift_errors_name_the_problem(tmp_path: Path, model_dir: Path) -> None:
    fill(tmp_path / "s", [traffic(400, 10)])
    rc, out = drift_cli(tmp_path / "s", model_dir)
    assert rc == 2 and "at least 50" in out
    rc, out = drift_cli(tmp_path / "s", tmp_path / "models" / "cifar10" / "9")
    assert rc == 2 and "reference_stats.json" in out
    # Only the records of the version named by --model-dir count.
    other = tmp_path / "models" / "cifar10" / "4"
    write_reference(other)
    rc, out = drift_cli(tmp_path / "s", other, "--min-records", "1")
    assert rc == 2 and "only 0 sampled" in out


# --------------------------------------------------------------------------------------------------
# Drift metrics


def test_observe_counts_classes_confidence_ood_and_abstentions() -> None:
    _, prediction = traffic(500, 40)
    version = {"version": "3"}
    top = prediction.probabilities.argmax(axis=1)
    before = {c: metric("gateway_predicted_class_total", {**version, "class_name": c}) for c in CLASSES}
    conf_before = metric("gateway_prediction_confidence_bucket", {**version, "le": "0.5"})
    conf_count = metric("gateway_prediction_confidence_count", version)
    ood_count = metric("gateway_ood_score_count", version)
    abstained = metric("gateway_abstained_total", version)
    drift_metrics.observe(prediction)
    for i, c in enumerate(CLASSES):
        after = metric("gateway_predicted_class_total", {**version, "class_name": c})
        assert after - before[c] == np.sum(top == i)
    assert metric("gateway_prediction_confidence_count", version) - conf_count == 40
    low = np.sum(prediction.probabilities.max(axis=1) <= 0.5)
    assert metric("gateway_prediction_confidence_bucket", {**version, "le": "0.5"}) - conf_before == low
    assert metric("gateway_ood_score_count", version) - ood_count == 40
    assert metric("gateway_abstained_total", version) - abstained == np.sum(prediction.abstain)


def test_observe_skips_ood_for_versions_without_it_and_never_raises() -> None:
    _, p = traffic(501, 5)
    version = {"version": "77"}
    drift_metrics.observe(Prediction(p.probabilities, CLASSES, "cifar10", 77))
    assert metric("gateway_prediction_confidence_count", version) == 5
    assert metric("gateway_ood_score_count", version) == 0
    assert REGISTRY.get_sample_value("gateway_abstained_total", version) is None
    drift_metrics.observe(Prediction(np.zeros((2, 3)), CLASSES, "cifar10", 78))  # class index out of names


# --------------------------------------------------------------------------------------------------
# Through the gateway (serving/api.py calls record() and observe() after each successful predict)


@pytest.mark.slow
def test_the_gateway_samples_what_it_answered(exported_model, tmp_path: Path) -> None:
    from serving.app import create_app

    settings = Settings(model_base_path=exported_model.base_path, model_name=exported_model.name,
                        poll_interval_s=60, sample_rate=1.0, sample_dir=tmp_path / "samples")  # fmt: skip
    app = create_app(settings)
    try:
        rng = np.random.default_rng(9)
        pixels = rng.integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
        files = []
        for i, p in enumerate(pixels):
            buf = io.BytesIO()
            Image.fromarray(p).save(buf, format="PNG")
            files.append((io.BytesIO(buf.getvalue()), f"img{i}.png", "image/png"))
        client = app.test_client()
        version = {"version": str(exported_model.version)}
        answered = metric("gateway_prediction_confidence_count", version)
        r = client.post("/v1/predict", data={"images": files}, headers={"X-Request-ID": "sampled-1"},
                        content_type="multipart/form-data")  # fmt: skip
        assert r.status_code == 200, r.get_data(as_text=True)
        body = r.get_json()
        sampler = sampling.app_sampler(app)
        assert sampler is not None and sampler.flush(10)
        with SampleStore(tmp_path / "samples", create=False) as store:
            records = list(store.records())
        assert [(rec.request_id, rec.image_index) for rec in records] == [("sampled-1", 0), ("sampled-1", 1)]
        for rec, answer, p in zip(records, body["predictions"], pixels, strict=True):
            np.testing.assert_array_equal(rec.image, p)  # 32x32 uploads are the model input as is
            assert rec.model_version == body["model"]["version"] == exported_model.version
            assert rec.label == answer["top_k"][0]["label"]
            assert rec.class_names == exported_model.class_names
            served = answer["probabilities"]
            np.testing.assert_allclose(rec.probabilities, [served[c] for c in rec.class_names], atol=1e-6)
            if answer.get("ood_score") is not None:
                assert rec.ood_score == pytest.approx(answer["ood_score"], abs=1e-4)
                assert rec.abstain == answer["abstain"]
        assert metric("gateway_prediction_confidence_count", version) - answered == 2
    finally:
        app.extensions["gateway.backend"].close()
