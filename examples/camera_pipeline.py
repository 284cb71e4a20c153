"""A real-time camera loop on the vlm-export runtime as a library (no torch).

A capture thread reads the camera continuously and hands over the newest frame whenever the
pipeline is ready for one, so the label stays close to the picture even when the engine is
slower than the camera (stale frames are dropped and counted). TCA adapts online and its
reservoir is kept in a state file, so a restart resumes where it stopped.

    python examples/camera_pipeline.py BUNDLE SOURCE [--state reservoir.npz] [--show]

SOURCE: a camera index (0), a stream URL, a video file, or a GStreamer pipeline ending in
appsink (Jetson CSI camera: "nvarguscamerasrc ! video/x-raw(memory:NVMM),width=1280,height=720,
framerate=30/1 ! nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR !
appsink drop=1"). Needs the runtime and OpenCV: pip install ".[camera]" from a clone (and
opencv-python instead of opencv-python-headless for --show).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time

from vlm_export.runtime import UserError, open_pipeline
from vlm_export.runtime.io.capture import NewestFrame
from vlm_export.runtime.io.display import Window
from vlm_export.runtime.io.sources import open_source


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("source", help="camera index (0), stream URL, video or GStreamer pipeline")
    parser.add_argument("--state", help="reservoir state file (resumed, saved on exit)")
    parser.add_argument("--show", action="store_true", help="display the labelled frames")
    parser.add_argument("--max-frames", type=int, default=0)
    args = parser.parse_args()
    stop = threading.Event()  # Ctrl-C stops between frames, so the saved state is whole
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    started, frames = time.perf_counter(), 0
    try:
        window = Window() if args.show else None
        source = open_source(args.source)
        reader = NewestFrame(source) if source.live else source  # a video file: every frame
        with open_pipeline(args.bundle, state=args.state) as pipeline, reader:
            for frame in reader:
                result = pipeline.classify(frame.data, channels="BGR", topk=3)  # OpenCV: BGR
                frames += 1
                dropped = getattr(reader, "dropped", 0)
                print(
                    f"{frame.index:6d} {result.class_name:<20} {result.score:.2f}  "
                    f"({result.timings['total']:.1f} ms, {dropped} stale frames dropped)"
                )
                shown = window is None or window.show(frame, result)
                if not shown or stop.is_set() or frames == args.max_frames:
                    break
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - started
    print(f"{frames} frames in {seconds:.1f} s ({frames / max(seconds, 1e-9):.1f} fps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
