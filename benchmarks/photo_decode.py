"""Large photos: decoding an upload to the model's 32x32 pixels, whole or at libjpeg's reduced scale,
and the gateway answering phone photos beside the naive app.

One run, one machine, in this order:

1. The photos: CIFAR-10 sample photos (../shared/data/cifar10-sample; synthetic pictures where it is
   absent) upscaled to VGA (640x480), 1080p (1920x1080) and a 12 Mpx phone photo (4032x3024), with
   sensor-like noise (+-8 levels) so the files are as large as a camera's (a smooth upscale compresses
   to a fraction and decodes faster than any real photo), saved as JPEG quality 90, 4:2:0.
2. Decode time in this process, one thread, each photo `--repeats` times, median: "whole" is the
   decode the gateway ran before (open, load, EXIF upright, RGB, resize to 32x32); "reduced" is
   contract.preprocess.decode_to_model_input, the one every path runs now (libjpeg scales the DCT
   by 1/2, 1/4 or 1/8 while decoding). Also how far apart the two leave the model's pixels.
3. Memory: the peak RSS rise of one 12 Mpx decode, each way, in a fresh process.
4. Training data: an image folder of the 12 Mpx photos (2 classes, train and test) read by the
   trainer (trainer/data/imagefolder.py) on one decoding thread and on one per CPU, median of 3.
5. End to end: the default profile's model (untrained: speed does not depend on the weights),
   published as `make serve` publishes it; the gateway under gunicorn as `make serve` starts it and
   the naive app (benchmarks/naive_flask.py: full decode, Keras `model.predict`) on the same model
   file, each loaded by `hey` posting the 12 Mpx photo, one per request, at 1 and 2 clients.

  python -m benchmarks.photo_decode [--repeats 5] [--duration 8] [--out benchmarks/results/photo_decode.json]
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.machine import describe, load_average
from contract.preprocess import decode_to_model_input, jpeg_decode_scale, to_model_input, upright

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = PROJECT_ROOT.parent / "shared" / "data" / "cifar10-sample"
SIZES = {"VGA": (640, 480), "1080p": (1920, 1080), "12 Mpx phone": (4032, 3024)}  # px, width x height
PHONE = "12 Mpx phone"
PHOTOS = 8  # photos per size: decode time depends on content
NOISE = 8  # +- levels of sensor-like noise: camera-sized files
QUALITY = 90
CLIENTS = (1, 2)
NAIVE_CLIENTS = (1,)


def source_pictures(count: int, sample_dir: Path = SAMPLE_DIR) -> tuple[list[Image.Image], str]:
    """`count` pictures to upscale, and what they are."""
    labels = sample_dir / "labels.csv"
    if labels.is_file():
        with labels.open(newline="") as f:
            names = [row[0] for row in csv.reader(f) if row and row[0] != "file"][:count]
        pictures = [Image.open(sample_dir / n).convert("RGB") for n in names]
        return pictures, f"CIFAR-10 sample photos ({sample_dir.name})"
    y, x = np.mgrid[0:32, 0:32]
    pictures = [Image.fromarray(np.stack([x * 8, y * 8, (x * y * (i + 1)) % 256], -1).astype(np.uint8))
                for i in range(count)]  # fmt: skip
    return pictures, "synthetic gradients (the CIFAR-10 sample folder is absent)"


def photo_jpeg(picture: Image.Image, size: tuple[int, int], seed: int) -> bytes:
    pixels = np.asarray(picture.resize(size, Image.Resampling.BICUBIC), dtype=np.int16)
    noise = np.random.default_rng(seed).integers(-NOISE, NOISE + 1, pixels.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=QUALITY)
    return buffer.getvalue()


def whole(data: bytes) -> np.ndarray:
    """The decode before reduced scaling: every pixel of the JPEG, then the shared resize."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return to_model_input(upright(image))


def reduced(data: bytes) -> np.ndarray:
    return decode_to_model_input(Image.open(io.BytesIO(data)))


def median_ms(decode: Any, data: bytes, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        decode(data)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def measure_decode(photos: dict[str, list[bytes]], repeats: int) -> list[dict[str, Any]]:
    rows = []
    for name, files in photos.items():
        width, height = SIZES[name]
        whole_ms = [median_ms(whole, data, repeats) for data in files]
        reduced_ms = [median_ms(reduced, data, repeats) for data in files]
        difference = np.stack([np.abs(whole(d).astype(int) - reduced(d).astype(int)) for d in files])
        row = {
            "photo": name, "width": width, "height": height, "photos": len(files),
            "mean_file_kib": round(sum(map(len, files)) / len(files) / 1024),
            "scale": f"1/{jpeg_decode_scale(width, height)}",
            "whole_ms": statistics.mean(whole_ms), "reduced_ms": statistics.mean(reduced_ms),
            "max_pixel_difference": int(difference.max()),
            "mean_pixel_difference": float(difference.mean()),
            "share_pixels_changed": float((difference > 0).mean()),
        }  # fmt: skip
        row["speedup"] = row["whole_ms"] / row["reduced_ms"]
        rows.append(row)
        print(f"{name:13} {width}x{height} {row['mean_file_kib']:5} KiB  scale {row['scale']:4} whole "
              f"{row['whole_ms']:7.1f} ms  reduced {row['reduced_ms']:6.1f} ms  {row['speedup']:4.1f}x  "
              f"pixels: max {row['max_pixel_difference']}, mean {row['mean_pixel_difference']:.3f}",
              flush=True)  # fmt: skip
    return rows


# VmHWM, the process's peak resident memory (KiB): unlike getrusage's ru_maxrss, which Linux carries
# over from the parent across exec, it starts afresh in the new process.
_PEAK_RSS = """
import sys
from pathlib import Path
from benchmarks.photo_decode import reduced, whole

def peak_kib():
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith("VmHWM:")).split()[1])

data = Path(sys.argv[2]).read_bytes()
decode = {"whole": whole, "reduced": reduced}[sys.argv[1]]
decode(Path(sys.argv[3]).read_bytes())  # a small JPEG first: libraries loaded, buffers warm
before = peak_kib()
decode(data)
print(peak_kib() - before)
"""


def measure_memory(photo: Path, small: Path) -> dict[str, float]:
    """Peak RSS rise (MiB) of one decode of `photo`, each way, each in a fresh process (Linux)."""
    rise = {}
    for way in ("whole", "reduced"):
        command = [sys.executable, "-c", _PEAK_RSS, way, str(photo), str(small)]
        done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=PROJECT_ROOT)
        rise[f"{way}_mib"] = int(done.stdout.strip()) / 1024
    print(f"peak RSS rise of one {PHONE} decode: whole {rise['whole_mib']:.0f} MiB, "
          f"reduced {rise['reduced_mib']:.0f} MiB", flush=True)  # fmt: skip
    return rise


def measure_folder(photos: list[bytes], root: Path, repeats: int = 3) -> dict[str, Any]:
    """Seconds the trainer takes to read a folder of `photos` (each in both classes, both splits),
    on one decoding thread and on its default, one per CPU."""
    from trainer.data import imagefolder

    for split in ("train", "test"):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            for i, data in enumerate(photos):
                (root / split / name / f"{i}.jpg").write_bytes(data)
    threads = len(os.sched_getaffinity(0))
    seconds = {}
    for count in (1, threads):
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            imagefolder.load(root, threads=count)
            times.append(time.perf_counter() - started)
        seconds[count] = statistics.median(times)
    files = 4 * len(photos)
    row = {"files": files, "threads": threads, "one_thread_s": seconds[1], "threads_s": seconds[threads],
           "speedup": seconds[1] / seconds[threads]}  # fmt: skip
    print(f"image folder of {files} {PHONE} photos: 1 thread {row['one_thread_s']:.2f} s, {threads} threads "
          f"{row['threads_s']:.2f} s ({row['speedup']:.1f}x)", flush=True)  # fmt: skip
    return row


def measure_end_to_end(photo: bytes, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The gateway and the naive app answering the 12 Mpx photo (benchmarks/serving_latency's tools)."""
    from benchmarks import serving_latency as serve
    from loadtest.gateway_process import running_gateway
    from serving.config import Settings
    from trainer.export.publish import publish

    run_dir, info = serve.build_run_dir(work / "run", serve.DEFAULT_PROFILE)
    publish(run_dir, work / "models", serve.MODEL_NAME)
    env = serve.gateway_env(work / "models")
    deadline = Settings.from_env({**os.environ, **env}).request_deadline_s
    load = serve.Load(args.duration, args.warmup, timeout_s=math.ceil(deadline) + 10)
    results: dict[str, Any] = {"runs": [], "model": {k: v for k, v in info.items() if k != "class_names"}}
    body = work / "photo.multipart"
    body.write_bytes(serve.multipart("images", [photo]))
    with running_gateway(env, workers=args.workers, startup_timeout=180) as gateway:
        server = serve.Server([gateway.master], gateway.url)
        url = gateway.url + "/v1/predict"
        serve.measure_levels(results, serve.GATEWAY, url, body, 1, CLIENTS, load, server)
    naive_body = work / "naive.multipart"
    naive_body.write_bytes(serve.multipart("file", [photo]))
    serve.measure_naive_app(results, run_dir, naive_body, args, load, clients=NAIVE_CLIENTS)
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5, help="decodes of each photo, each way (median)")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds measured per load level")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of each level not counted")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers, as `make serve` runs")
    parser.add_argument("--sample-dir", type=Path, default=SAMPLE_DIR, help="CIFAR-10 sample photos")
    parser.add_argument("--skip-serve", action="store_true", help="decode and memory only, no HTTP")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    pictures, source = source_pictures(PHOTOS, args.sample_dir)
    photos = {
        name: [photo_jpeg(p, size, seed=i) for i, p in enumerate(pictures)] for name, size in SIZES.items()
    }
    results: dict[str, Any] = {
        "command": "python -m benchmarks.photo_decode " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {**describe(), "load_average_1m": load_average()},
        "photos": {"source": source, "per_size": PHOTOS, "noise_levels": NOISE, "jpeg_quality": QUALITY},
        "decode": measure_decode(photos, args.repeats),
    }
    with tempfile.TemporaryDirectory(prefix="bench-photo-") as tmp:
        work = Path(tmp)
        phone, small = work / "phone.jpg", work / "small.jpg"
        phone.write_bytes(photos[PHONE][0])
        small.write_bytes(photos["VGA"][0])
        results["memory"] = measure_memory(phone, small)
        results["folder"] = measure_folder(photos[PHONE], work / "folder")
        if not args.skip_serve:
            served = measure_end_to_end(photos[PHONE][0], work, args)
            results["serve"] = {"photo": f"the first {PHONE} photo ({len(photos[PHONE][0]) // 1024} KiB)",
                                **served}  # fmt: skip
    results["machine"]["load_average_1m_end"] = load_average()
    results["wall_s"] = round(time.monotonic() - started, 1)
    print(f"\nwall time {results['wall_s']:.0f} s")
    if args.out:
        from benchmarks.serving_latency import write_json

        write_json(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
