"""An embedded camera pipeline built on the vlm-export runtime as a library (no torch).

Reads frames from a camera index, a video file or a stream URL, classifies each with TCA adapting
online, draws the label on the frame, and keeps the reservoir in a state file so that a restart
resumes where it stopped.

    python examples/camera_pipeline.py BUNDLE SOURCE [--state reservoir.npz] [--show]

Needs the runtime and OpenCV: pip install "vlm-export[camera]".
"""

from __future__ import annotations

import argparse
import sys
import time

from vlm_export.core.errors import UserError
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.engines.factory import open_backend
from vlm_export.runtime.pipeline import Pipeline
from vlm_export.runtime.sources import VideoSource, import_cv2
from vlm_export.runtime.tca.stage import build_reservoir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("source", help="camera index (0), video file or stream URL")
    parser.add_argument("--state", help="reservoir state file (resumed, saved on exit)")
    parser.add_argument("--show", action="store_true", help="display the annotated frames")
    parser.add_argument("--max-frames", type=int, default=0)
    args = parser.parse_args()
    cv2 = import_cv2()
    try:
        bundle = Bundle.open(args.bundle)
        backend = open_backend(bundle, "auto")
        method = "tca" if bundle.manifest["condensation"] else "zeroshot"
        reservoir = build_reservoir(bundle, state=args.state) if method == "tca" else None
        pipeline = Pipeline(bundle, backend, method, reservoir=reservoir, topk=3)
        source = VideoSource(int(args.source) if args.source.isdigit() else args.source)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    started, frames = time.perf_counter(), 0
    try:
        with source:
            for frame in source:
                result = pipeline.process(frame.data, frame.index, frame.source)  # BGR fast path
                frames += 1
                text = f"{result.class_name} {result.topk[0][2]:.2f}"
                print(f"{frame.index:6d} {text}  ({result.timings['total']:.1f} ms)")
                if args.show:
                    cv2.putText(
                        frame.data, text, (10, 30), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (0, 255, 0), 2
                    )
                    cv2.imshow("vlm-edge", frame.data)
                    if cv2.waitKey(1) & 0xFF == ord("q"):
                        break
                if args.max_frames and frames >= args.max_frames:
                    break
    except KeyboardInterrupt:
        pass
    finally:
        if args.state and pipeline.reservoir is not None:
            pipeline.save_state(args.state)
    seconds = time.perf_counter() - started
    print(f"{frames} frames in {seconds:.1f} s ({frames / max(seconds, 1e-9):.1f} fps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
