"""Regenerate the bundled demo assets (run once by the project; the results are committed).

    python scripts/make_demo_data.py

- demo_source.jpg: a 288x288 crop (x 80..368, y 0..288) of scikit-image's ``astronaut`` (NASA portrait of
  Eileen Collins, public domain), JPEG quality 90.
- demo_source_landmarks.npy: its 68 landmarks (float32 pixels of demo_source.jpg) from the dlib backend.
- demo_driver_landmarks.npy: ``pybilayer.synthetic.talking_head_sequence(100, 256)``, 4 s at 25 fps.
"""

from __future__ import annotations

import io
import os

import numpy as np

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pybilayer", "data")
SOURCE_CROP = (slice(0, 288), slice(80, 368))  # rows, columns of astronaut()
DRIVER_FRAMES, DRIVER_SIZE, DRIVER_FPS = 100, 256, 25.0


def main() -> None:
    from PIL import Image
    from skimage import data

    from pybilayer.landmarks import create_detector, detect_one
    from pybilayer.synthetic import talking_head_sequence

    crop = np.ascontiguousarray(data.astronaut()[SOURCE_CROP])
    buffer = io.BytesIO()
    Image.fromarray(crop).save(buffer, format="JPEG", quality=90)
    with open(os.path.join(DATA_DIR, "demo_source.jpg"), "wb") as f:
        f.write(buffer.getvalue())
    # Landmarks of the decoded JPEG, i.e. of exactly the pixels users load.
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    landmarks = detect_one(decoded, create_detector("dlib"))
    np.save(os.path.join(DATA_DIR, "demo_source_landmarks.npy"), landmarks.astype(np.float32))
    driver = talking_head_sequence(DRIVER_FRAMES, DRIVER_SIZE, fps=DRIVER_FPS)
    np.save(os.path.join(DATA_DIR, "demo_driver_landmarks.npy"), driver.astype(np.float32))


if __name__ == "__main__":
    main()
